//! `canopy-imp`: see the crate documentation and docs/imp.md.
//!
//! * `canopy-imp run --instance ID --rank R [--host H] --submitter WHO`:
//!   the broker's entry point (installed setuid root).
//! * `canopy-imp keygen PATH`: an Ed25519 key pair (CA, node or user).
//! * `canopy-imp verify-receipt --node-key FILE... RECEIPT`: offline check.
//! * `canopy-imp check-config`: load imp.toml and its keys (not setuid).

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use canopy_imp::config::ImpConfig;
use canopy_imp::frame::{read_input, write_record, TAG_RECEIPT, TAG_REFUSED};
use canopy_imp::receipt::{verify_receipt, Receipt, RECEIPT_VERSION};
use canopy_imp::replay::DirReplayCache;
use canopy_imp::run::{self, SystemAccounts, EXIT_REFUSED};
use canopy_imp::verify::{check, Roots, Submitter, Target};
use canopy_imp::{keys, receipt};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "canopy-imp",
    about = "Canopy's privilege-separated exec helper (see docs/imp.md)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Verify the framed certificate and request on stdin and run the
    /// command as the certified user (invoked by the broker's user only).
    Run {
        /// The instance id this broker serves.
        #[arg(long)]
        instance: String,
        /// This broker's rank in it.
        #[arg(long)]
        rank: u32,
        /// The host name recorded in the receipt (default: this host's).
        #[arg(long)]
        host: Option<String>,
        /// Who submitted the request, as the broker authenticated it: the
        /// user's principal, or `service:NAME` for a delegated request.
        #[arg(long)]
        submitter: String,
    },
    /// Write a new Ed25519 key pair: PATH (secret, 0600) and PATH.pub.
    Keygen { path: PathBuf },
    /// Check a receipt envelope offline against node public keys.
    VerifyReceipt {
        /// A node's public key file (repeat for several nodes).
        #[arg(long = "node-key", required = true)]
        node_keys: Vec<PathBuf>,
        receipt: PathBuf,
    },
    /// Load imp.toml and the keys it names, and say what it allows.
    CheckConfig,
    /// Internal: the second stage of `run` (see docs/imp.md).
    #[command(name = "_exec", hide = true)]
    Exec,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Exec => {
            let err = run::stage2_main();
            eprintln!("canopy-imp: {err}");
            ExitCode::from(126)
        }
        Cmd::Run {
            instance,
            rank,
            host,
            submitter,
        } => {
            let out: Arc<Mutex<dyn Write + Send>> = Arc::new(Mutex::new(std::io::stdout()));
            match run_helper(instance, rank, host, &submitter, out.clone()) {
                Ok(code) => code,
                Err(e) => {
                    let msg = format!("rank {rank}: {e:#}");
                    eprintln!("canopy-imp: {msg}");
                    let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
                    let _ = write_record(&mut *w, TAG_REFUSED, msg.as_bytes());
                    ExitCode::from(EXIT_REFUSED)
                }
            }
        }
        other => match tool(other) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("canopy-imp: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The tools run with the invoker's own rights: a setuid helper must not
/// create or read files as root for whoever calls it.
fn drop_to_invoker() -> anyhow::Result<()> {
    use nix::unistd::{getresgid, getresuid, setgroups, setresgid, setresuid};
    if !run::privileged_invocation() {
        return Ok(());
    }
    let (u, g) = (getresuid()?.real, getresgid()?.real);
    if !u.is_root() {
        setgroups(&[g]).context("cannot drop supplementary groups")?;
    }
    setresgid(g, g, g).context("cannot drop the setgid group")?;
    setresuid(u, u, u).context("cannot drop the setuid user")?;
    if !u.is_root() && setresuid(0.into(), 0.into(), 0.into()).is_ok() {
        bail!("could regain root after dropping privileges; refusing to go on");
    }
    Ok(())
}

fn tool(cmd: Cmd) -> anyhow::Result<()> {
    drop_to_invoker()?;
    match cmd {
        Cmd::Keygen { path } => {
            let k = keys::generate()?;
            let public = keys::write_pair(&path, &k)?;
            println!(
                "wrote {} and {} (key id {})",
                path.display(),
                public.display(),
                canopy_imp::envelope::key_id(&k.verifying_key())
            );
        }
        Cmd::VerifyReceipt { node_keys, receipt } => {
            let keys = node_keys
                .iter()
                .map(|p| keys::read_public(p))
                .collect::<Result<Vec<_>, _>>()?;
            let wire = std::fs::read(&receipt)
                .with_context(|| format!("cannot read {}; check the path", receipt.display()))?;
            let (r, k) = verify_receipt(&wire, &keys)?;
            println!(
                "{} (signed by {})",
                serde_json::to_string(&r)?,
                canopy_imp::envelope::key_id(k)
            );
        }
        Cmd::CheckConfig => {
            let path = run::config_path(
                std::env::var_os(run::CONFIG_ENV),
                run::privileged_invocation(),
            );
            let c = ImpConfig::load(&path, 0)?;
            let k = c.load_keys(0)?;
            println!(
                "{}: broker user {}, users {:?}, groups {:?}, {} ca key(s), {} node key(s), receipt key {}",
                path.display(),
                c.broker_user,
                c.users,
                c.groups,
                k.cas.len(),
                k.nodes.len(),
                canopy_imp::envelope::key_id(&k.receipt.verifying_key())
            );
        }
        Cmd::Run { .. } | Cmd::Exec => unreachable!("handled in main"),
    }
    Ok(())
}

fn run_helper(
    instance: String,
    rank: u32,
    host: Option<String>,
    submitter: &str,
    out: Arc<Mutex<dyn Write + Send>>,
) -> anyhow::Result<ExitCode> {
    let privileged = run::privileged_invocation();
    let path = run::config_path(std::env::var_os(run::CONFIG_ENV), privileged);
    let config = ImpConfig::load(&path, 0)?;

    // Only the broker's user may invoke the helper.
    let invoker = nix::unistd::getuid();
    let broker = nix::unistd::User::from_name(&config.broker_user)
        .ok()
        .flatten()
        .with_context(|| {
            format!(
                "broker_user {} in {} has no account; correct imp.toml",
                config.broker_user,
                path.display()
            )
        })?;
    if invoker != broker.uid {
        bail!(
            "canopy-imp may be run only by the broker's user {} (uid {}), not by uid {}; it is started by the broker",
            config.broker_user,
            broker.uid,
            invoker
        );
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("canopy-imp is not running as root; install it setuid root (`chown root canopy-imp && chmod 4755 canopy-imp`)");
    }

    let keys = config.load_keys(0)?;
    let input = read_input(&mut canopy_imp::frame::UnbufferedStdin)?;
    let mut cache = DirReplayCache::open(&config.replay_cache, 0)?;
    let target = Target {
        instance,
        rank,
        submitter: Submitter::parse(submitter),
    };
    let roots = Roots {
        config: &config,
        cas: &keys.cas,
        nodes: &keys.nodes,
    };
    let approved = check(
        &roots,
        &input.cert,
        &input.request,
        &target,
        now(),
        &mut cache,
        &SystemAccounts,
        &run::is_executable,
    )
    .map_err(|e| anyhow::anyhow!("refused: {e}"))?;

    let env = run::command_env(&approved, &config.search_path, rank, std::env::vars());
    let orders = run::stage2_for(&approved, env);
    let signals = run::forwarded_signals().context("cannot set up signal forwarding")?;
    let start = now();
    let child = run::spawn_stage2(&orders).context("cannot start the command")?;
    let outcome = run::supervise(child, signals, out.clone()).context("lost the command")?;
    let end = now();
    let host = match host {
        Some(h) => h,
        None => nix::unistd::gethostname()?.to_string_lossy().into_owned(),
    };
    let r = Receipt {
        v: RECEIPT_VERSION,
        request_digest: approved.request_digest.clone(),
        rank,
        host,
        uid: approved.account.uid,
        start,
        end,
        exit: outcome.exit,
        stdout_sha256: outcome.stdout_sha256,
        stderr_sha256: outcome.stderr_sha256,
    };
    let wire = r.sign(&keys.receipt);
    {
        let mut w = out.lock().unwrap_or_else(|p| p.into_inner());
        write_record(&mut *w, TAG_RECEIPT, &wire).context("cannot write the receipt")?;
    }
    Ok(match outcome.exit {
        receipt::Exit::Status(c) => ExitCode::from(c.clamp(0, 255) as u8),
        receipt::Exit::Signal(s) => ExitCode::from((128 + s).clamp(0, 255) as u8),
    })
}
