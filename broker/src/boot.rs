//! One interface over the ways a broker learns its place in the tree: PMI
//! ([`crate::bootstrap::PmiBootstrap`]: `canopy start`, hydra's
//! `mpiexec`, `srun --mpi=pmi2`) and a shared config file
//! ([`crate::system::ConfigBootstrap`]: system instances). A bootstrap
//! binds the broker's sockets, learns its neighbours' business cards and
//! admits its children's keys; [`run`] then builds the broker and runs it.

use crate::error::BrokerError;
use crate::node::{Bound, Broker, Plan, Signals};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

/// What a bootstrap hands over: the plan, the sockets it bound (children
/// already admitted), and the launcher's connection to watch, if any.
pub struct Planned {
    pub plan: Plan,
    pub bound: Bound,
    /// Readable means the launcher went away (the broker then exits).
    pub pmi_fd: Option<OwnedFd>,
}

/// A way to bootstrap one broker.
pub trait Bootstrap {
    /// Bind, exchange business cards, admit the children. Every broker of
    /// the instance must have admitted its children before any of them
    /// connects (the PMI bootstrap fences for this; a system instance's
    /// keys come from the config, so there is nothing to wait for).
    fn plan(&mut self) -> Result<Planned, BrokerError>;
    /// The broker is built and connecting: last touches (key files,
    /// socket permissions, readiness notification).
    fn started(&mut self, broker: Broker) -> Result<Broker, BrokerError> {
        Ok(broker)
    }
    /// The broker stopped: release what the bootstrap holds (PMI, key
    /// exchange, runtime directory).
    fn finish(&mut self) {}
}

/// Build the broker from `boot` and run it until it stops. Signal handlers
/// go in after the bootstrap, so a SIGTERM during wire-up (scancel) ends
/// the process at once.
pub fn run(boot: &mut dyn Bootstrap) -> Result<(), BrokerError> {
    let broker = build(boot)?;
    let result = broker.run();
    boot.finish();
    result
}

/// [`run`] without running: the built broker (for `canopy start` under a
/// launcher, which starts the command beside it). Call
/// [`Bootstrap::finish`] after [`Broker::run`].
pub fn build(boot: &mut dyn Bootstrap) -> Result<Broker, BrokerError> {
    check_libzmq()?;
    let planned = match boot.plan() {
        Ok(p) => p,
        Err(e) => {
            boot.finish();
            return Err(e);
        }
    };
    let signals = signal_pipe()?;
    let broker = Broker::new(planned.plan, planned.bound, planned.pmi_fd, signals)?;
    boot.started(broker)
}

/// Fail fast if the linked libzmq cannot do what Canopy needs.
pub fn check_libzmq() -> Result<(), BrokerError> {
    if !zmq::has("curve").unwrap_or(false) {
        return Err(BrokerError::Libzmq("CURVE"));
    }
    if !zmq::has("ipc").unwrap_or(false) {
        return Err(BrokerError::Libzmq("ipc transport"));
    }
    Ok(())
}

pub(crate) fn signal_pipe() -> Result<Signals, BrokerError> {
    let (r, w) = UnixStream::pair().map_err(|source| BrokerError::Io {
        what: "create the signal pipe",
        path: PathBuf::from("socketpair"),
        source,
    })?;
    w.set_nonblocking(true).ok();
    r.set_nonblocking(true).ok();
    let signals = Signals {
        pipe: r,
        term: Default::default(),
        hup: Default::default(),
    };
    let flags = [
        (signal_hook::consts::SIGTERM, &signals.term),
        (signal_hook::consts::SIGINT, &signals.term),
        (signal_hook::consts::SIGHUP, &signals.hup),
    ];
    for (sig, flag) in flags {
        signal_hook::flag::register(sig, Arc::clone(flag)).map_err(|source| BrokerError::Io {
            what: "install signal handlers",
            path: PathBuf::from("signal"),
            source,
        })?;
        let w2 = w.try_clone().map_err(|source| BrokerError::Io {
            what: "clone the signal pipe",
            path: PathBuf::from("socketpair"),
            source,
        })?;
        signal_hook::low_level::pipe::register(sig, w2).map_err(|source| BrokerError::Io {
            what: "install signal handlers",
            path: PathBuf::from("signal"),
            source,
        })?;
    }
    Ok(signals)
}
