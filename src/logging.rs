//! Log setup: `tracing` to stderr as text or JSON, filtered by level or directives.

use tracing_subscriber::EnvFilter;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `filter` is a level (`info`) or a list of
/// `tracing` directives (`info,cryptdisk_csi::crypt=debug`).
pub fn init(format: LogFormat, filter: &str) -> Result<(), String> {
    let filter = parse_filter(filter)?;
    // Colours only for a person at a terminal, never into log files or collectors.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("installing the log subscriber: {e}"))
}

const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// A bare word must be a level: `tracing` would otherwise take a typo such as
/// `inof` for a target name and silently log nothing.
fn parse_filter(filter: &str) -> Result<EnvFilter, String> {
    let bad = |why: String| {
        format!(
            "log level {filter:?}: {why}; expected one of {LEVELS:?} or directives such as info,cryptdisk_csi::crypt=debug"
        )
    };
    for directive in filter.split(',') {
        let level = directive.rsplit('=').next().unwrap_or_default().trim();
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(bad(format!("{level:?} is not a level")));
        }
    }
    EnvFilter::try_new(filter).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_directives_parse_and_typos_do_not() {
        for good in [
            "info",
            "DEBUG",
            "warn,cryptdisk_csi::crypt=trace",
            "libcryptsetup=debug",
        ] {
            assert!(parse_filter(good).is_ok(), "{good}");
        }
        for bad in ["loud", "inof", "", "info,x=verbose"] {
            assert!(parse_filter(bad).is_err(), "{bad}");
        }
    }
}
