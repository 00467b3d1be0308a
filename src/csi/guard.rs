//! Per-volume operation guard: one operation at a time on a volume; a concurrent
//! call on the same volume is answered ABORTED, as the CSI spec asks, and the CO
//! retries it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tonic::Status;

#[derive(Clone, Default)]
pub struct Guards {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held for the length of one operation; releases the key on drop.
pub struct Held {
    busy: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Guards {
    /// Takes the guard for `key`, or ABORTED when an operation holds it.
    pub fn take(&self, key: &str) -> Result<Held, Status> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(key.to_string()) {
            return Err(Status::aborted(format!(
                "an operation on {key} is already in progress; retry later"
            )));
        }
        Ok(Held {
            busy: self.busy.clone(),
            key: key.to_string(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_taker_is_aborted_until_release() {
        let g = Guards::default();
        let held = g.take("v1").unwrap();
        assert_eq!(g.take("v1").err().unwrap().code(), tonic::Code::Aborted);
        let _other = g.take("v2").unwrap();
        drop(held);
        assert!(g.take("v1").is_ok());
    }
}
