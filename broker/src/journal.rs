//! Log lines for journald. When stderr is the journal (systemd sets
//! `JOURNAL_STREAM=DEV:INODE` to stderr's device and inode), each line
//! starts with its sd-daemon(3) priority, `<3>` for an error down to `<7>`
//! for debug and trace, so that `journalctl -p warning` filters. Time
//! stamps and colours are left out: the journal adds its own.

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The syslog priority of a tracing level (sd-daemon.h: SD_ERR = 3,
/// SD_WARNING = 4, SD_INFO = 6, SD_DEBUG = 7; tracing has no notice).
pub(crate) fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Does `JOURNAL_STREAM` (`DEV:INODE`) name the file stderr is? A value
/// inherited by a process whose stderr was redirected elsewhere does not.
pub(crate) fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>() == Ok(dev) && i.parse::<u64>() == Ok(ino)
}

/// Is stderr the journal?
pub(crate) fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(v) = v.to_str() else { return false };
    match nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&std::io::stderr())) {
        Ok(st) => names_stream(v, st.st_dev, st.st_ino),
        Err(_) => false,
    }
}

/// Prefix each event with `<N>`, its priority, then format it with `F`.
pub(crate) struct Priority<F>(pub(crate) F);

impl<S, N, F> FormatEvent<S, N> for Priority<F>
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
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Log to stderr, filtered by RUST_LOG (default warn); under systemd,
/// with priorities and without time stamps.
pub(crate) fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    if stderr_is_journal() {
        // Under systemd: `<4>` etc. before each line, no time or colours.
        let format = tracing_subscriber::fmt::format()
            .with_target(false)
            .without_time();
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(Priority(format))
            .init();
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_level_has_its_sd_daemon_priority() {
        assert_eq!(priority(Level::ERROR), 3);
        assert_eq!(priority(Level::WARN), 4);
        assert_eq!(priority(Level::INFO), 6);
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(names_stream("8:12345", 8, 12345));
        assert!(names_stream("8:12345\n", 8, 12345));
        assert!(!names_stream("8:12346", 8, 12345));
        assert!(!names_stream("9:12345", 8, 12345));
        assert!(!names_stream("", 8, 12345));
        assert!(!names_stream("8", 8, 12345));
        assert!(!names_stream("x:y", 8, 12345));
    }

    /// The prefix is the first thing on the line, before the level and
    /// message, for every level.
    #[test]
    fn formatted_lines_start_with_the_priority() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .event_format(Priority(
                tracing_subscriber::fmt::format()
                    .with_target(false)
                    .without_time(),
            ))
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::error!("e1");
            tracing::warn!("w1");
            tracing::info!("i1");
            tracing::debug!("d1");
            tracing::trace!("t1");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        for (line, (prio, level, msg)) in lines.iter().zip([
            ("<3>", "ERROR", "e1"),
            ("<4>", "WARN", "w1"),
            ("<6>", "INFO", "i1"),
            ("<7>", "DEBUG", "d1"),
            ("<7>", "TRACE", "t1"),
        ]) {
            assert!(line.starts_with(prio), "{line:?} should start with {prio}");
            assert!(line.contains(level) && line.ends_with(msg), "{line:?}");
        }
    }
}
