//! [`VolumeId`] and [`SnapshotId`]: `<backend>:<location>:<name>`.
//!
//! - `backend` is one of `local`, `azure`, `gcp` ([`BackendKind`]), exactly so
//!   spelled (lower case).
//! - `location` (a node, region or zone, as the backend defines it) and the disk
//!   or snapshot name are each 1 to [`MAX_PART_LEN`] characters of
//!   `[A-Za-z0-9._-]`, and neither `.` nor `..`: safe as a file name or as a cloud
//!   resource name, with no path separator, NUL, space or non-ASCII character.
//! - The whole id is at most [`MAX_ID_LEN`] bytes; longer input is refused before
//!   it is looked at any further.
//!
//! An id arrives from the CO, which may hand back anything, so errors describe
//! what was expected and what was found, but echo at most [`ECHO_LIMIT`]
//! characters of the input, escaped so that control characters and non-ASCII
//! text cannot reach a log line raw.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 400;
/// Longest location, disk or snapshot name, in characters (all ASCII).
pub const MAX_PART_LEN: usize = 128;
/// At most this many characters of rejected input appear in an error.
pub const ECHO_LIMIT: usize = 64;
/// The characters a location, disk or snapshot name may hold, for messages.
const ALLOWED: &str = "[A-Za-z0-9._-]";

/// Which disk backend owns a volume; also the controller's `--backend` and the
/// node's `--cloud`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum BackendKind {
    /// Sparse image files in a data directory on one machine, attached as loop
    /// devices.
    Local,
    /// Azure managed disks of Azure VMs.
    Azure,
    /// Compute Engine persistent disks of GCE VMs.
    Gcp,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Local, BackendKind::Azure, BackendKind::Gcp];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Local => "local",
            BackendKind::Azure => "azure",
            BackendKind::Gcp => "gcp",
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BackendKind {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        parse_backend(IdKind::Backend, s)
    }
}

/// What was being parsed when an [`IdError`] occurred.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdKind {
    Backend,
    Location,
    Volume,
    Snapshot,
}

impl IdKind {
    /// The shape of a valid value, for messages.
    pub fn format(self) -> &'static str {
        match self {
            IdKind::Backend => "local|azure|gcp",
            IdKind::Location => "<location>",
            IdKind::Volume => "<backend>:<location>:<disk>",
            IdKind::Snapshot => "<backend>:<location>:<snapshot>",
        }
    }
}

impl fmt::Display for IdKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdKind::Backend => "backend",
            IdKind::Location => "location",
            IdKind::Volume => "volume id",
            IdKind::Snapshot => "snapshot id",
        })
    }
}

/// Which component of an id an [`IdError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Location,
    Disk,
    Snapshot,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::Location => "location",
            Part::Disk => "disk name",
            Part::Snapshot => "snapshot name",
        })
    }
}

/// A short, escaped rendering of rejected input: quoted, at most [`ECHO_LIMIT`]
/// characters, everything but printable ASCII written as `\u{..}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Excerpt(String);

impl Excerpt {
    pub fn of(input: &str) -> Self {
        let mut out = String::with_capacity(ECHO_LIMIT + 16);
        out.push('"');
        for (shown, c) in input.chars().enumerate() {
            if shown == ECHO_LIMIT {
                out.push_str(&format!("\"... ({} bytes in all)", input.len()));
                return Excerpt(out);
            }
            match c {
                '"' | '\\' => {
                    out.push('\\');
                    out.push(c);
                }
                ' '..='~' => out.push(c),
                _ => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            }
        }
        out.push('"');
        Excerpt(out)
    }
}

impl fmt::Display for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A single rejected character, described safely.
fn describe_char(c: &char) -> String {
    match *c {
        '!'..='~' => format!("`{c}`"),
        ' ' => "a space".to_string(),
        '\0' => "a NUL byte".to_string(),
        _ => format!("U+{:04X}", *c as u32),
    }
}

/// Why a string is not a valid backend, location, volume id or snapshot id.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("invalid {kind}: expected `{}`, found an empty string", .kind.format())]
    Empty { kind: IdKind },

    #[error("invalid {kind}: expected at most {MAX_ID_LEN} bytes, found {len} bytes")]
    TooLong { kind: IdKind, len: usize },

    #[error(
        "invalid {kind}: expected 3 `:`-separated parts, as in `{}`, found {found} in {input}",
        .kind.format()
    )]
    Parts {
        kind: IdKind,
        found: usize,
        input: Excerpt,
    },

    #[error("invalid {kind}: expected backend `local`, `azure` or `gcp`, found {found}")]
    UnknownBackend { kind: IdKind, found: Excerpt },

    #[error(
        "invalid {kind}: expected a {part} of 1 to {MAX_PART_LEN} characters of {ALLOWED}, found an empty {part}"
    )]
    EmptyPart { kind: IdKind, part: Part },

    #[error(
        "invalid {kind}: expected a {part} of at most {MAX_PART_LEN} characters, found {len} characters"
    )]
    PartTooLong {
        kind: IdKind,
        part: Part,
        len: usize,
    },

    #[error(
        "invalid {kind}: expected only {ALLOWED} in the {part}, found {} at character {position}",
        describe_char(.found)
    )]
    BadChar {
        kind: IdKind,
        part: Part,
        found: char,
        position: usize,
    },

    #[error("invalid {kind}: expected a {part} other than `.` or `..`, found `{found}`")]
    DotPart {
        kind: IdKind,
        part: Part,
        found: &'static str,
    },
}

fn parse_backend(kind: IdKind, s: &str) -> Result<BackendKind, IdError> {
    BackendKind::ALL
        .into_iter()
        .find(|b| b.as_str() == s)
        .ok_or_else(|| IdError::UnknownBackend {
            kind,
            found: Excerpt::of(s),
        })
}

fn is_allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Checks one location, disk or snapshot name.
fn check_part(kind: IdKind, part: Part, s: &str) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::EmptyPart { kind, part });
    }
    if let Some((position, found)) = s.chars().enumerate().find(|(_, c)| !is_allowed(*c)) {
        return Err(IdError::BadChar {
            kind,
            part,
            found,
            position,
        });
    }
    // Only ASCII is left, so bytes are characters.
    if s.len() > MAX_PART_LEN {
        return Err(IdError::PartTooLong {
            kind,
            part,
            len: s.len(),
        });
    }
    match s {
        "." => Err(IdError::DotPart {
            kind,
            part,
            found: ".",
        }),
        ".." => Err(IdError::DotPart {
            kind,
            part,
            found: "..",
        }),
        _ => Ok(()),
    }
}

/// Checks a location on its own, as a backend does with the one it serves.
pub fn check_location(location: &str) -> Result<(), IdError> {
    check_part(IdKind::Location, Part::Location, location)
}

/// The one parser behind both id types.
fn parse_id(kind: IdKind, last: Part, s: &str) -> Result<(BackendKind, String, String), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if s.len() > MAX_ID_LEN {
        return Err(IdError::TooLong { kind, len: s.len() });
    }
    let parts: Vec<&str> = s.split(':').collect();
    let [backend, location, name] = parts[..] else {
        return Err(IdError::Parts {
            kind,
            found: parts.len(),
            input: Excerpt::of(s),
        });
    };
    let backend = parse_backend(kind, backend)?;
    check_part(kind, Part::Location, location)?;
    check_part(kind, last, name)?;
    Ok((backend, location.to_string(), name.to_string()))
}

/// Generates an id type: same shape, different last component.
macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:expr, $part:expr, $field:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name {
            backend: BackendKind,
            location: String,
            $field: String,
        }

        impl $name {
            /// Builds an id from its parts, validating each.
            pub fn new(
                backend: BackendKind,
                location: impl Into<String>,
                $field: impl Into<String>,
            ) -> Result<Self, IdError> {
                let location = location.into();
                let $field = $field.into();
                check_part($kind, Part::Location, &location)?;
                check_part($kind, $part, &$field)?;
                Ok($name {
                    backend,
                    location,
                    $field,
                })
            }

            pub fn backend(&self) -> BackendKind {
                self.backend
            }

            pub fn location(&self) -> &str {
                &self.location
            }

            pub fn $field(&self) -> &str {
                &self.$field
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(s: &str) -> Result<Self, IdError> {
                let (backend, location, $field) = parse_id($kind, $part, s)?;
                Ok($name {
                    backend,
                    location,
                    $field,
                })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}:{}:{}", self.backend, self.location, self.$field)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let s = String::deserialize(deserializer)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A volume id, `<backend>:<location>:<disk>`.
    VolumeId,
    IdKind::Volume,
    Part::Disk,
    disk
);

id_type!(
    /// A snapshot id, `<backend>:<location>:<snapshot>`.
    SnapshotId,
    IdKind::Snapshot,
    Part::Snapshot,
    snapshot
);

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(s: &str) -> Result<VolumeId, IdError> {
        s.parse()
    }

    #[test]
    fn backend_kind_round_trips() {
        for b in BackendKind::ALL {
            assert_eq!(b.to_string().parse::<BackendKind>().unwrap(), b);
        }
        let e = "LOCAL".parse::<BackendKind>().unwrap_err();
        assert!(matches!(e, IdError::UnknownBackend { .. }));
        assert_eq!(
            e.to_string(),
            "invalid backend: expected backend `local`, `azure` or `gcp`, found \"LOCAL\""
        );
        assert!("".parse::<BackendKind>().is_err());
        assert!("local ".parse::<BackendKind>().is_err());
    }

    #[test]
    fn valid_ids_parse_and_round_trip() {
        for s in [
            "local:default:disk-0123",
            "azure:westeurope:pvc_1.2-3",
            "gcp:us-central1-a:D",
            "local:a:b",
            "local:...:a..b",
        ] {
            let id = vol(s).unwrap();
            assert_eq!(id.to_string(), s);
            let snap: SnapshotId = s.parse().unwrap();
            assert_eq!(snap.to_string(), s);
        }
        let id = vol("gcp:us-central1-a:disk-1").unwrap();
        assert_eq!(id.backend(), BackendKind::Gcp);
        assert_eq!(id.location(), "us-central1-a");
        assert_eq!(id.disk(), "disk-1");
        let snap: SnapshotId = "local:node-1:snap-1".parse().unwrap();
        assert_eq!(snap.backend(), BackendKind::Local);
        assert_eq!(snap.location(), "node-1");
        assert_eq!(snap.snapshot(), "snap-1");
        assert_eq!(format!("{id:?}"), "VolumeId(gcp:us-central1-a:disk-1)");
    }

    #[test]
    fn longest_parts_are_accepted() {
        let long = "a".repeat(MAX_PART_LEN);
        let id = vol(&format!("azure:{long}:{long}")).unwrap();
        assert_eq!(id.disk().len(), MAX_PART_LEN);
        let e = vol(&format!("azure:{long}:{long}b")).unwrap_err();
        assert_eq!(
            e,
            IdError::PartTooLong {
                kind: IdKind::Volume,
                part: Part::Disk,
                len: MAX_PART_LEN + 1
            }
        );
        assert!(e.to_string().contains("at most 128 characters, found 129"));
    }

    #[test]
    fn path_traversal_is_refused() {
        assert!(matches!(
            vol("local:default:../x"),
            Err(IdError::BadChar {
                found: '/',
                position: 2,
                part: Part::Disk,
                ..
            })
        ));
        assert!(matches!(
            vol("local:default:.."),
            Err(IdError::DotPart { found: "..", .. })
        ));
        assert!(matches!(
            vol("local:.:disk"),
            Err(IdError::DotPart {
                found: ".",
                part: Part::Location,
                ..
            })
        ));
        assert!(vol("local:default:/etc/passwd").is_err());
        assert!(vol("local:a/b:disk").is_err());
        assert!(vol("local:default:a\\b").is_err());
        let e = vol("local:default:..").unwrap_err().to_string();
        assert_eq!(
            e,
            "invalid volume id: expected a disk name other than `.` or `..`, found `..`"
        );
    }

    #[test]
    fn nul_and_spaces_are_refused() {
        let e = vol("local:default:disk\0").unwrap_err();
        assert!(matches!(e, IdError::BadChar { found: '\0', .. }));
        assert_eq!(
            e.to_string(),
            "invalid volume id: expected only [A-Za-z0-9._-] in the disk name, found a NUL byte at character 4"
        );
        assert!(vol("local:default:di sk").is_err());
        assert!(vol(" local:default:disk").is_err());
        assert!(vol("local:default:disk\n").is_err());
    }

    #[test]
    fn empty_parts_are_refused() {
        assert_eq!(
            vol("").unwrap_err(),
            IdError::Empty {
                kind: IdKind::Volume
            }
        );
        assert_eq!(
            vol("local::disk").unwrap_err(),
            IdError::EmptyPart {
                kind: IdKind::Volume,
                part: Part::Location
            }
        );
        assert_eq!(
            vol("local:default:").unwrap_err(),
            IdError::EmptyPart {
                kind: IdKind::Volume,
                part: Part::Disk
            }
        );
        assert!(matches!(
            vol(":default:disk"),
            Err(IdError::UnknownBackend { .. })
        ));
        assert!(matches!(vol("::"), Err(IdError::UnknownBackend { .. })));
        let e = "local:x:".parse::<SnapshotId>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid snapshot id: expected a snapshot name of 1 to 128 characters of [A-Za-z0-9._-], found an empty snapshot name"
        );
    }

    #[test]
    fn wrong_number_of_parts_is_refused() {
        for (s, n) in [
            ("local", 1),
            ("local:default", 2),
            ("local:default:disk:extra", 4),
            ("local:default:disk:", 4),
            ("local:::disk", 4),
        ] {
            assert_eq!(
                vol(s).unwrap_err(),
                IdError::Parts {
                    kind: IdKind::Volume,
                    found: n,
                    input: Excerpt::of(s)
                },
                "{s}"
            );
        }
        assert_eq!(
            vol("local:a:b:c").unwrap_err().to_string(),
            "invalid volume id: expected 3 `:`-separated parts, as in `<backend>:<location>:<disk>`, found 4 in \"local:a:b:c\""
        );
    }

    #[test]
    fn too_long_is_refused_without_echo() {
        let s = format!("local:default:{}", "x".repeat(MAX_ID_LEN));
        let e = vol(&s).unwrap_err();
        assert_eq!(
            e,
            IdError::TooLong {
                kind: IdKind::Volume,
                len: s.len()
            }
        );
        assert!(!e.to_string().contains("xxx"));
        // Exactly at the limit, the id is refused for its parts instead.
        let s = format!("local:default:{}", "x".repeat(MAX_ID_LEN - 14));
        assert_eq!(s.len(), MAX_ID_LEN);
        assert!(matches!(vol(&s), Err(IdError::PartTooLong { .. })));
    }

    #[test]
    fn unicode_is_refused_and_escaped() {
        let e = vol("local:défault:disk").unwrap_err();
        assert!(matches!(
            e,
            IdError::BadChar {
                found: 'é',
                position: 1,
                part: Part::Location,
                ..
            }
        ));
        assert!(e.to_string().contains("found U+00E9 at character 1"));
        // A fullwidth colon is not a separator, and not allowed either.
        assert!(matches!(
            vol("local:default\u{ff1a}x:disk"),
            Err(IdError::BadChar {
                found: '\u{ff1a}',
                ..
            })
        ));
        // Right-to-left override must not reach a message raw.
        let e = vol("lo\u{202e}cal:default:disk").unwrap_err().to_string();
        assert!(!e.contains('\u{202e}'), "{e}");
        assert!(e.contains("\\u{202e}"), "{e}");
    }

    #[test]
    fn hostile_input_echo_is_bounded() {
        let s = format!("{}:b:c:d", "\u{1F600}".repeat(300));
        let e = vol(&s).unwrap_err();
        // Too long in bytes: nothing of it is echoed.
        assert!(matches!(e, IdError::TooLong { .. }));
        let s = format!("{}:b:c:d", "A\n".repeat(90));
        let msg = vol(&s).unwrap_err().to_string();
        assert!(!msg.contains('\n'));
        assert!(msg.len() < 500, "{msg}");
        assert!(
            msg.ends_with(&format!("... ({} bytes in all)", s.len())),
            "{msg}"
        );
        let bad_backend = vol(&format!("{}:b:c", "q".repeat(200)))
            .unwrap_err()
            .to_string();
        assert!(bad_backend.len() < 200, "{bad_backend}");
    }

    #[test]
    fn new_validates_like_parse() {
        assert!(VolumeId::new(BackendKind::Local, "default", "../x").is_err());
        assert!(VolumeId::new(BackendKind::Local, "", "x").is_err());
        assert!(SnapshotId::new(BackendKind::Azure, "a", "b:c").is_err());
        let id = VolumeId::new(BackendKind::Local, "default", "d").unwrap();
        assert_eq!(id, "local:default:d".parse().unwrap());
        assert!(check_location("node-1.example").is_ok());
        assert!(check_location("node/1").is_err());
    }

    #[test]
    fn serde_uses_the_text_form() {
        let id: VolumeId = "local:default:disk-1".parse().unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"local:default:disk-1\"");
        assert_eq!(serde_json::from_str::<VolumeId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<VolumeId>("\"local:default:../x\"").is_err());
        let snap: SnapshotId = serde_json::from_str("\"gcp:z:s\"").unwrap();
        assert_eq!(snap.snapshot(), "s");
    }
}
