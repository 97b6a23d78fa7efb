//! Writing a tool's output to stdout without panicking when the reader
//! has gone away (`canopy overlay status --json | head -1`): `println!`
//! panics on EPIPE (Rust ignores SIGPIPE), which exits with status 101.
//! [`print`] returns [`ReaderGone`] instead, and `main` exits quietly with
//! status 141 (128 + SIGPIPE, what a shell reports for a C tool killed by
//! SIGPIPE) without a message.

use std::io::Write;

/// Exit status when stdout's reader went away: 128 + SIGPIPE.
pub(crate) const READER_GONE_STATUS: i32 = 141;

/// stdout's reader closed its end of the pipe.
#[derive(Debug, thiserror::Error)]
#[error("the output's reader went away")]
pub(crate) struct ReaderGone;

/// Write `args` to stdout and flush. EPIPE is [`ReaderGone`]; any other
/// failure (a full disk) is an error saying so.
pub(crate) fn print(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(ReaderGone.into()),
        Err(e) => Err(anyhow::anyhow!(
            "cannot write to stdout: {e}; check where the output goes (a full disk?)"
        )),
    }
}

/// Is this error (or its cause) the reader going away?
pub(crate) fn reader_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<ReaderGone>()
            || c.downcast_ref::<canopy_broker::tools::ToolError>()
                .is_some_and(|t| t.reader_gone())
    })
}

/// `print!` that does not panic on EPIPE; use in functions returning
/// `anyhow::Result`.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::out::print(format_args!($($arg)*))?
    };
}

/// `println!` that does not panic on EPIPE; use in functions returning
/// `anyhow::Result`.
macro_rules! outln {
    () => {
        $crate::out::print(format_args!("\n"))?
    };
    ($($arg:tt)*) => {
        $crate::out::print(format_args!("{}\n", format_args!($($arg)*)))?
    };
}
