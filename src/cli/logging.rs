//! The daemon's logging set-up: the format (`[log] format`, or `TOKEND_LOG_FORMAT`), the
//! filter (`RUST_LOG`), and, when stderr is the journal, a priority prefix on each entry.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use crate::config::LogFormat;

/// The environment variable that overrides `[log] format`.
const FORMAT_VAR: &str = "TOKEND_LOG_FORMAT";

/// Why logging cannot be set up as asked.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error(
        "{FORMAT_VAR}={0:?} is not a log format: use \"text\" or \"json\" (it overrides [log] format), or unset it"
    )]
    Format(String),
}

/// Logs go to stderr, filtered by `RUST_LOG` (default `info`): human-readable (coloured
/// only on a terminal) or JSON lines. Under journald each entry starts with its priority
/// and has no timestamp of tokend's own (the journal adds one). An already installed
/// subscriber (tests embedding the CLI) is kept.
pub fn init(configured: LogFormat) -> Result<(), LoggingError> {
    let format = format_override()?.unwrap_or(configured);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let journal = stderr_is_journal();
    let text = tracing_subscriber::fmt::format().with_ansi(false);
    let _ = match (format, journal) {
        (LogFormat::Json, false) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Json, true) => builder
            .with_ansi(false)
            .event_format(Journal(
                tracing_subscriber::fmt::format().json().flatten_event(true),
            ))
            .try_init(),
        (LogFormat::Text, true) => builder
            .with_ansi(false)
            .event_format(Journal(text.without_time()))
            .try_init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    Ok(())
}

/// `TOKEND_LOG_FORMAT`, when set (an empty value counts as unset).
fn format_override() -> Result<Option<LogFormat>, LoggingError> {
    match std::env::var_os(FORMAT_VAR) {
        None => Ok(None),
        Some(value) => parse_format(&value.to_string_lossy()),
    }
}

fn parse_format(value: &str) -> Result<Option<LogFormat>, LoggingError> {
    match value {
        "" => Ok(None),
        "text" => Ok(Some(LogFormat::Text)),
        "json" => Ok(Some(LogFormat::Json)),
        other => Err(LoggingError::Format(other.to_string())),
    }
}

/// systemd sets `$JOURNAL_STREAM` to the device and inode of the stream it connects to
/// the journal; a child whose stderr was redirected elsewhere inherits the variable, so
/// stderr itself is compared with it.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stderr) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(stderr).metadata() else {
        return false;
    };
    journal_stream_is(&stream.to_string_lossy(), meta.dev(), meta.ino())
}

/// Whether `JOURNAL_STREAM`'s `DEVICE:INODE` names the file with `dev` and `ino`.
fn journal_stream_is(stream: &str, dev: u64, ino: u64) -> bool {
    stream
        .split_once(':')
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
        == Some((dev, ino))
}

/// sd-daemon(3)'s priority prefixes: `journalctl -p warning` then filters by level.
fn priority(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "<3>",
        Level::WARN => "<4>",
        Level::INFO => "<6>",
        _ => "<7>",
    }
}

/// An event format for journald's stream protocol, around the inner format `F`: the
/// entry starts with the event's priority, and stays one entry (journald splits at each
/// newline, so a message's own newlines are written as `\n`).
struct Journal<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut entry = String::new();
        self.0.format_event(ctx, Writer::new(&mut entry), event)?;
        // The text format pads levels (` INFO`); the prefix needs no gap.
        let entry = entry.trim_start();
        let entry = entry.strip_suffix('\n').unwrap_or(entry);
        writer.write_str(priority(event.metadata().level()))?;
        writer.write_str(&entry.replace('\n', "\\n"))?;
        writer.write_char('\n')
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Everything written, for the assertions.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    fn journal_lines(json: bool) -> Vec<String> {
        let out = Captured::default();
        let builder = tracing_subscriber::fmt()
            .with_max_level(Level::TRACE)
            .with_ansi(false)
            .with_writer(out.clone());
        let emit = || {
            tracing::error!(
                account = "zy",
                "the new config is invalid:\nline 3: bad\nline 9: worse"
            );
            tracing::warn!(
                account = "zy",
                outcome = "transient_error",
                "refresh failed"
            );
            tracing::info!("ready");
            tracing::debug!("requesting a token");
            tracing::trace!("details");
        };
        if json {
            let text = tracing_subscriber::fmt::format().json().flatten_event(true);
            let sub = builder.event_format(Journal(text)).finish();
            tracing::subscriber::with_default(sub, emit);
        } else {
            let text = tracing_subscriber::fmt::format()
                .with_ansi(false)
                .without_time();
            let sub = builder.event_format(Journal(text)).finish();
            tracing::subscriber::with_default(sub, emit);
        }
        let bytes = out.0.lock().unwrap().clone();
        String::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn each_entry_starts_with_its_priority_and_stays_one_line() {
        let lines = journal_lines(false);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        let prefixes: Vec<&str> = lines.iter().map(|l| &l[..3]).collect();
        assert_eq!(prefixes, ["<3>", "<4>", "<6>", "<7>", "<7>"]);
        assert_eq!(
            lines[0],
            r#"<3>ERROR tokend::cli::logging::tests: the new config is invalid:\nline 3: bad\nline 9: worse account="zy""#
        );
        assert!(
            lines[1].contains("outcome=\"transient_error\""),
            "{}",
            lines[1]
        );
        assert!(lines[2].starts_with("<6>INFO "), "{}", lines[2]);
        assert!(lines.iter().all(|l| !l.contains('\x1b')), "{lines:#?}");
    }

    #[test]
    fn json_entries_get_the_prefix_too() {
        let lines = journal_lines(true);
        assert_eq!(lines.len(), 5, "{lines:#?}");
        let (prefix, object) = lines[1].split_at(3);
        assert_eq!(prefix, "<4>");
        let object: serde_json::Value = serde_json::from_str(object).unwrap();
        assert_eq!(object["level"], "WARN");
        assert_eq!(object["outcome"], "transient_error");
        let first: serde_json::Value = serde_json::from_str(&lines[0][3..]).unwrap();
        assert_eq!(
            first["message"],
            "the new config is invalid:\nline 3: bad\nline 9: worse"
        );
    }

    #[test]
    fn journal_stream_is_compared_with_the_stream_itself() {
        assert!(journal_stream_is("64769:1234", 64769, 1234));
        assert!(!journal_stream_is("64769:1234", 64769, 1235));
        assert!(!journal_stream_is("64769", 64769, 1234));
        assert!(!journal_stream_is("", 0, 0));
    }

    #[test]
    fn the_format_variable_takes_text_json_or_nothing() {
        assert_eq!(parse_format("json").unwrap(), Some(LogFormat::Json));
        assert_eq!(parse_format("text").unwrap(), Some(LogFormat::Text));
        assert_eq!(parse_format("").unwrap(), None);
        let e = parse_format("JSON").unwrap_err().to_string();
        assert!(e.contains("TOKEND_LOG_FORMAT=\"JSON\""), "{e}");
        assert!(e.contains("\"text\" or \"json\""), "{e}");
    }
}
