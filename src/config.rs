//! Values parsed once at the edge: endpoints and the driver name.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a gRPC server listens or a client connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `unix:///path/to/csi.sock` (also `unix:/path`): what kubelet and the sidecars use.
    Unix(PathBuf),
    /// `tcp://host:port`: for tests and debugging only.
    Tcp(SocketAddr),
}

impl FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("unix:") {
            // unix:///abs/path and unix:/abs/path both name /abs/path.
            let path = rest.strip_prefix("//").unwrap_or(rest);
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!(
                    "endpoint {s:?}: a unix endpoint needs an absolute path, as in unix:///csi/csi.sock"
                ));
            }
            if path.contains('\0') {
                return Err(format!("endpoint {s:?} contains a NUL byte"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(rest) = s.strip_prefix("tcp://") {
            let addr = rest.parse::<SocketAddr>().map_err(|e| {
                format!("endpoint {s:?}: expected tcp://IP:PORT, as in tcp://127.0.0.1:10000 ({e})")
            })?;
            return Ok(Endpoint::Tcp(addr));
        }
        Err(format!(
            "endpoint {s:?}: expected unix:///path/to/socket or tcp://IP:PORT"
        ))
    }
}

impl Endpoint {
    /// Whether only this machine can reach the endpoint: a unix socket, or a
    /// loopback address (127.0.0.0/8, ::1, and 127.0.0.0/8 written as an
    /// IPv4-mapped IPv6 address). What a plaintext KMS may listen on.
    pub fn is_local(&self) -> bool {
        match self {
            Endpoint::Unix(_) => true,
            Endpoint::Tcp(addr) => match addr.ip() {
                std::net::IpAddr::V4(ip) => ip.is_loopback(),
                std::net::IpAddr::V6(ip) => {
                    ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
                }
            },
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
        }
    }
}

/// A CSI driver name as the spec allows it: at most 63 characters, alphanumerics,
/// `-`, `_` and `.`, beginning and ending with an alphanumeric.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverName(String);

impl DriverName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DriverName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
        let edges_ok = s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
        if s.len() > 63 || !edges_ok || !s.chars().all(ok_char) {
            return Err(format!(
                "driver name {s:?}: expected at most 63 characters of letters, digits, '-', '_' \
                 and '.', starting and ending with a letter or digit (as cryptdisk.csi.io)"
            ));
        }
        Ok(DriverName(s.to_string()))
    }
}

impl fmt::Display for DriverName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:///csi/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            "unix:/csi/csi.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/csi/csi.sock".into())
        );
        assert_eq!(
            "tcp://127.0.0.1:9000".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:9000".parse().unwrap())
        );
        for bad in [
            "",
            "/csi.sock",
            "unix://",
            "unix://relative",
            "tcp://host",
            "http://x:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        let e: Endpoint = "unix:///a/b".parse().unwrap();
        assert_eq!(e.to_string(), "unix:///a/b");
    }

    #[test]
    fn only_unix_sockets_and_loopback_are_local() {
        for local in [
            "unix:///run/kms.sock",
            "tcp://127.0.0.1:9000",
            "tcp://127.3.4.5:9000",
            "tcp://[::1]:9000",
            "tcp://[::ffff:127.0.0.1]:9000",
        ] {
            assert!(local.parse::<Endpoint>().unwrap().is_local(), "{local}");
        }
        for remote in [
            "tcp://0.0.0.0:9000",
            "tcp://[::]:9000",
            "tcp://10.0.0.1:9000",
            "tcp://128.0.0.1:9000",
            "tcp://[::ffff:10.0.0.1]:9000",
            "tcp://[::2]:9000",
        ] {
            assert!(!remote.parse::<Endpoint>().unwrap().is_local(), "{remote}");
        }
    }

    #[test]
    fn driver_names_follow_the_spec() {
        for good in ["cryptdisk.csi.io", "a", "x-y_z.1", &"a".repeat(63)] {
            assert!(good.parse::<DriverName>().is_ok(), "{good}");
        }
        for bad in ["", "-a", "a-", ".a", "a b", "a/b", &"a".repeat(64)] {
            assert!(bad.parse::<DriverName>().is_err(), "{bad}");
        }
    }
}
