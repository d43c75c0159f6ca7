//! The daemon's logs: `tracing` events written to stderr (the journal,
//! under systemd) as text lines or one JSON object a line, filtered by a
//! level, or by levels per module (`info,unlade::containerd=debug`).

/// How log events are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One line of text an event: level, module, message, then its fields
    /// as `key=value`.
    Text,
    /// One JSON object a line: `timestamp`, `level`, `target`, and
    /// `fields` (the message and every field), for log pipelines.
    Json,
}

/// Parses a filter: a level (`error`, `warn`, `info`, `debug`, `trace`,
/// `off`) or comma-separated `module=level` directives with an optional
/// default level.
pub fn parse_filter(s: &str) -> Result<tracing_subscriber::filter::Targets, String> {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    let level = |l: &str| -> Result<LevelFilter, String> {
        match l.trim() {
            "off" => Ok(LevelFilter::OFF),
            "error" => Ok(LevelFilter::ERROR),
            "warn" => Ok(LevelFilter::WARN),
            "info" => Ok(LevelFilter::INFO),
            "debug" => Ok(LevelFilter::DEBUG),
            "trace" => Ok(LevelFilter::TRACE),
            other => Err(format!(
                "{other:?} is not one of off, error, warn, info, debug, trace"
            )),
        }
    };
    // Events of modules no directive names: info, unless a bare level says.
    let mut t = Targets::new().with_default(LevelFilter::INFO);
    for d in s.split(',').filter(|d| !d.trim().is_empty()) {
        t = match d.split_once('=') {
            Some((target, l)) if !target.trim().is_empty() => {
                t.with_target(target.trim().to_string(), level(l)?)
            }
            Some(_) => return Err(format!("{d:?} names no module")),
            None => t.with_default(level(d)?),
        };
    }
    Ok(t)
}

/// Starts writing this process's log events to stderr. Called once, by
/// the daemon, before it does anything worth logging.
pub fn init(format: LogFormat, filter: tracing_subscriber::filter::Targets) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    // A second init (a library caller's own subscriber) is not an error:
    // theirs stays.
    let _ = match format {
        LogFormat::Text => registry.with(fmt.with_ansi(false)).try_init(),
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(false).with_current_span(false))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_levels_and_directives_and_name_a_bad_one() {
        assert!(parse_filter("info").is_ok());
        assert!(parse_filter("warn,unlade::containerd=debug").is_ok());
        // A module's level alone leaves the others at info, not off.
        let t = parse_filter("unlade::containerd=debug").unwrap();
        assert!(t.would_enable("unlade::containerd::service", &tracing::Level::DEBUG));
        assert!(t.would_enable("unlade::cli", &tracing::Level::INFO));
        assert!(!t.would_enable("unlade::cli", &tracing::Level::DEBUG));
        let e = parse_filter("loud").unwrap_err();
        assert!(e.contains("\"loud\""), "{e}");
    }
}
