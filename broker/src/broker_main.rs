//! `canopy-broker`: `canopy broker` alone, without the tools' code, so
//! that a long-lived broker maps less of its binary (docs/performance.md).
//! `canopy start` and `canopy broker` run it when it is installed next to
//! `canopy`; run by hand it takes the same arguments, with or without the
//! word `broker` first.
#![forbid(unsafe_code)]

mod broker_cmd;
mod journal;

fn main() {
    journal::init_logging();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "broker") {
        args.remove(1);
    }
    let result = check_expected_version().and_then(|()| {
        let args = broker_cmd::parse(args);
        broker_cmd::run(args)
    });
    broker_cmd::exit(result)
}

/// `canopy-broker` run by `canopy` (or `canopy start`) from next to it
/// must be the same build: an older one left behind would speak another
/// protocol or miss fixes. The variable is then cleared, so that nothing
/// the broker runs inherits it.
fn check_expected_version() -> anyhow::Result<()> {
    let Some(want) = std::env::var_os(canopy_broker::launcher::EXPECT_VERSION_ENV) else {
        return Ok(());
    };
    std::env::remove_var(canopy_broker::launcher::EXPECT_VERSION_ENV);
    anyhow::ensure!(
        want == canopy_broker::launcher::VERSION,
        "this canopy-broker is version {} but canopy is {}; install both from the same build",
        canopy_broker::launcher::VERSION,
        want.to_string_lossy()
    );
    Ok(())
}
