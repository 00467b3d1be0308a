//! The mapping from internal errors to gRPC codes, in one place per error type,
//! so handlers use `?` and every failure reaches the CO with the right code and
//! a message that says what to do.

use tonic::Status;

use crate::crypt;
use crate::kms::KeyError;
use crate::mount;

impl From<crypt::Error> for Status {
    fn from(e: crypt::Error) -> Self {
        use crypt::Error as E;
        let msg = e.to_string();
        match e {
            // The device holds something we must not touch, or a header we do not trust.
            E::NotBlank { .. } | E::NotLuks2 { .. } | E::BadHeader { .. } | E::BadToken { .. } => {
                Status::failed_precondition(msg)
            }
            E::WrongKey { .. } => Status::failed_precondition(format!(
                "{msg}: the KMS's master secret is not the one this volume was made with, or \
                 the disk holds another volume's header (a copy), whose key this volume's \
                 scope does not derive"
            )),
            E::MappingConflict { .. } => Status::already_exists(msg),
            E::Busy { .. } => Status::failed_precondition(format!(
                "{msg}: something still uses the volume (is it still mounted?)"
            )),
            E::BadKeyId(_)
            | E::KeyLength { .. }
            | E::Io { .. }
            | E::Libcrypt { .. }
            | E::Worker(_) => Status::internal(msg),
        }
    }
}

impl From<mount::Error> for Status {
    fn from(e: mount::Error) -> Self {
        use mount::Error as E;
        let msg = e.to_string();
        match e {
            E::InvalidOption { .. } | E::UnsupportedFsType { .. } => Status::invalid_argument(msg),
            E::AlreadyMounted { .. } => Status::already_exists(msg),
            E::Busy { .. } | E::FsckFailed { .. } | E::TooSmall { .. } => {
                Status::failed_precondition(msg)
            }
            E::LoopBusy { .. } => Status::unavailable(msg),
            _ => Status::internal(msg),
        }
    }
}

impl From<KeyError> for Status {
    fn from(e: KeyError) -> Self {
        let msg = e.to_string();
        match e {
            KeyError::Unavailable(_) => Status::unavailable(msg),
            KeyError::Refused(_) => Status::failed_precondition(msg),
            KeyError::Denied(_) => Status::permission_denied(msg),
            KeyError::Derive(_) => Status::internal(msg),
        }
    }
}
