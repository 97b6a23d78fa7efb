//! Key rotation, the shell's part: reading the certificate files (system
//! instances), holding the `.next` key loaded for `key.switch`, and
//! listening again with the new key. What happens when, and who is
//! admitted, is decided by the core (`core/keys.rs`, `core/relink.rs`);
//! this carries out its events `ReloadKeys`, `LoadNextKey`, `AdoptKey`
//! and `Rebind`.

use crate::core::keys::KeyRing;
use crate::error::BrokerError;
use crate::rotate::KeyFiles;
use crate::sockets::zerr;
use canopy_security::CurveKeypair;
use std::time::{Duration, Instant};
use tracing::info;

/// How long the old listener may take to close before a rebind fails.
const REBIND_LIMIT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(crate) struct Rekey {
    /// Certificate files (system instances): keys rotate.
    files: Option<KeyFiles>,
    /// The `.next` key loaded for `key.switch`.
    staged: Option<CurveKeypair>,
    /// The ROUTER's new key, waiting for the core's `Rebind`.
    server_key: Option<CurveKeypair>,
    /// A rebind whose old listener has not closed yet: (give up at, the
    /// switch's time).
    rebinding: Option<(Instant, Instant)>,
}

impl Rekey {
    /// Rotation on, from these files: the neighbours' keys they hold now.
    pub(crate) fn with_files(files: KeyFiles) -> Result<(Rekey, KeyRing), BrokerError> {
        let ring = files.load_ring()?;
        let rekey = Rekey {
            files: Some(files),
            ..Rekey::default()
        };
        Ok((rekey, ring))
    }

    /// A rebind is waiting for the old listener to close.
    pub(crate) fn rebinding(&self) -> bool {
        self.rebinding.is_some()
    }

    /// `ReloadKeys`: read the neighbours' certificates again.
    pub(crate) fn reload(&self) -> Result<KeyRing, String> {
        match &self.files {
            Some(f) => f
                .load_ring()
                .map_err(|e| format!("{e}; the previous keys stay in force")),
            None => Err("this broker has no certificate files to reload".into()),
        }
    }

    /// `LoadNextKey`: load and hold the `.next` key; its public key.
    pub(crate) fn load_next(&mut self) -> Result<[u8; 32], String> {
        match self.files.as_ref().map(KeyFiles::load_next) {
            Some(Ok(kp)) => {
                let public = *kp.public();
                self.staged = Some(kp);
                Ok(public)
            }
            Some(Err(e)) => Err(e.to_string()),
            None => Err("this broker has no certificate files".into()),
        }
    }

    /// `AdoptKey`: the held key becomes `keys` (new parent connections use
    /// it); a broker with children also listens with it at `Rebind`.
    pub(crate) fn adopt(&mut self, keys: &mut CurveKeypair, listening: bool) {
        if let Some(kp) = self.staged.take() {
            if listening {
                self.server_key = Some(CurveKeypair::from_secret(zeroize::Zeroizing::new(
                    *kp.secret(),
                )));
            }
            *keys = kp;
        }
    }

    /// `Rebind`: listen again on the same endpoint with the new key.
    pub(crate) fn start_rebind(
        &mut self,
        router: &zmq::Socket,
        ep: &str,
        since_switch_ms: u64,
    ) -> Result<(), BrokerError> {
        let Some(kp) = self.server_key.take() else {
            return Ok(());
        };
        router.unbind(ep).map_err(zerr("unbind the router"))?;
        router
            .set_curve_secretkey(kp.secret())
            .map_err(zerr("set curve secret key"))?;
        let now = Instant::now();
        self.rebinding = Some((
            now + REBIND_LIMIT,
            now - Duration::from_millis(since_switch_ms),
        ));
        self.retry_rebind(router, ep)
    }

    /// The old listener closes asynchronously: the bind is retried on each
    /// turn of the loop (every 2 ms), never by sleeping.
    pub(crate) fn retry_rebind(
        &mut self,
        router: &zmq::Socket,
        ep: &str,
    ) -> Result<(), BrokerError> {
        let Some((deadline, switched)) = self.rebinding else {
            return Ok(());
        };
        match router.bind(ep) {
            Ok(()) => {
                info!(
                    "rotate: listening for children with the new key {} ms after the switch",
                    switched.elapsed().as_millis()
                );
                self.rebinding = None;
                Ok(())
            }
            Err(zmq::Error::EADDRINUSE) if Instant::now() < deadline => Ok(()),
            Err(e) => Err(BrokerError::Bind {
                endpoint: ep.to_string(),
                reason: format!("rebinding with the new key: {}", e.message()),
            }),
        }
    }
}
