#![forbid(unsafe_code)]

mod broker_cmd;
mod cli;
mod journal;
mod manual;
#[macro_use]
mod out;
mod cert_cli;
mod receipt_cli;

use anyhow::{Context, Result};
use broker_cmd::secs;
use canopy_broker::bootstrap::BrokerOpts;
use canopy_broker::launcher::{start, StartOpts};
use canopy_broker::node::Transport;
use canopy_broker::tools;
use cli::{AclCmd, AuditCmd, Cli, Cmd, ConfigCmd, EventCmd, KeyCmd, OverlayCmd, ServiceCmd};
use std::path::PathBuf;
use std::time::Duration;

/// `canopy start` passes these flags on to the brokers it launches.
impl broker_cmd::GssArgs {
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut a = vec!["--mechanism".to_string(), self.mechanism.clone()];
        for (flag, v) in [
            ("--principal", self.principal.clone()),
            ("--kex-listen", self.kex_listen.clone()),
            (
                "--gss-max-lifetime",
                self.gss_max_lifetime.map(|s| s.to_string()),
            ),
            (
                "--gss-max-bindings",
                self.gss_max_bindings.map(|n| n.to_string()),
            ),
        ] {
            if let Some(v) = v {
                a.push(flag.into());
                a.push(v);
            }
        }
        a
    }
}

impl broker_cmd::TimingArgs {
    pub(crate) fn to_args(self) -> Vec<String> {
        vec![
            "--heartbeat".into(),
            self.heartbeat.to_string(),
            "--torpid".into(),
            self.torpid.to_string(),
            "--lost".into(),
            self.lost.to_string(),
        ]
    }
}

impl broker_cmd::BudgetArgs {
    /// The same flags, for the brokers `canopy start` launches.
    pub(crate) fn to_args(&self) -> Vec<String> {
        self.flags()
            .into_iter()
            .flat_map(|(k, v)| [k.flag(), v.to_string()])
            .collect()
    }
}

/// `canopy broker`: run `canopy-broker` instead when it is installed next
/// to this binary (the same broker without the tools' code). Returns when
/// there is none, and the broker then runs in this process.
pub(crate) fn exec_sibling() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let Some(path) = canopy_broker::launcher::sibling_broker() else {
        return Ok(());
    };
    let err = std::process::Command::new(&path)
        .args(std::env::args_os().skip(1))
        .env(
            canopy_broker::launcher::EXPECT_VERSION_ENV,
            canopy_broker::launcher::VERSION,
        )
        .exec();
    Err(anyhow::anyhow!(
        "cannot run {}: {err}; it belongs next to canopy, from the same build (reinstall canopy, or remove it to run the broker in canopy itself)",
        path.display()
    ))
}

/// Parse the command line. `canopy broker` parses only its own arguments
/// (`broker_cmd`), and hands over to `canopy-broker` when that is
/// installed next to this binary.
fn parse_cli() -> Result<Cli> {
    use clap::{CommandFactory, FromArgMatches};
    if std::env::args_os().nth(1).is_some_and(|a| a == "broker") {
        exec_sibling()?;
        let args = broker_cmd::parse(std::env::args_os().skip(1));
        return Ok(Cli {
            key: None,
            server_key: None,
            kex: None,
            gss_target: None,
            gss_principal: None,
            cmd: Cmd::Broker(args),
        });
    }
    let matches = Cli::command().get_matches();
    if let Some(("broker", sub)) = matches.subcommand() {
        broker_cmd::refuse_config_flags(sub, Cli::command);
    }
    Ok(Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit()))
}

fn main() {
    journal::init_logging();
    match parse_cli().and_then(run) {
        // `| head -1`: the reader has what it wanted; nothing to report.
        Err(e) if out::reader_gone(&e) => std::process::exit(out::READER_GONE_STATUS),
        result => broker_cmd::exit(result),
    }
}

fn run(cli: Cli) -> Result<i32> {
    // Still single-threaded here: hand the key flags to the client library.
    if let Some(k) = &cli.key {
        std::env::set_var(canopy_client::KEY_ENV, k);
    }
    if let Some(k) = &cli.server_key {
        std::env::set_var(canopy_client::SERVER_KEY_ENV, k);
    }
    for (var, v) in [
        (canopy_client::KEX_ENV, &cli.kex),
        (canopy_client::GSS_TARGET_ENV, &cli.gss_target),
        (canopy_client::GSS_PRINCIPAL_ENV, &cli.gss_principal),
    ] {
        if let Some(v) = v {
            std::env::set_var(var, v);
        }
    }
    match cli.cmd {
        Cmd::Start {
            size,
            interface,
            fanout,
            tcp,
            port,
            rundir,
            broker_path,
            timeout,
            listen_clients,
            keep_going,
            allow,
            policy,
            audit,
            timing,
            gss,
            budgets,
            command,
        } => {
            timing.to_timing()?;
            gss.to_opts()?;
            let budget_values = budgets.to_budgets()?;
            let mut broker_args = timing.to_args();
            broker_args.extend(gss.to_args());
            broker_args.extend(budgets.to_args());
            let listen_clients_opt = listen_clients.clone();
            if let Some(ep) = listen_clients {
                broker_args.push("--listen-clients".into());
                broker_args.push(ep);
            }
            let policy_text = if allow.is_empty() {
                None
            } else {
                Some(policy_from_allow(&allow)?)
            };
            if let Some(p) = &policy {
                // Fail before starting anything if the policy is bad.
                canopy_acl::Acl::load(p)?;
                broker_args.push("--policy".into());
                broker_args.push(std::path::absolute(p)?.display().to_string());
            }
            if let Some(a) = &audit {
                anyhow::ensure!(
                    policy.is_some() || policy_text.is_some(),
                    "--audit needs --policy or --allow: without a policy only the owner can connect"
                );
                broker_args.push("--audit".into());
                broker_args.push(std::path::absolute(a)?.display().to_string());
            }
            if canopy_broker::allocation::launched() {
                anyhow::ensure!(
                    !tcp,
                    "--tcp and --port are for a local instance; under a launcher each broker listens where --interface says"
                );
                anyhow::ensure!(
                    !keep_going,
                    "--keep-going is for a local instance; under a launcher a broker whose parent is lost exits"
                );
                let _ = broker_path;
                return Ok(canopy_broker::allocation::run(
                    canopy_broker::allocation::AllocOpts {
                        broker: BrokerOpts {
                            fanout,
                            rundir,
                            instance: None,
                            transport: Transport::Ipc,
                            client_listen: listen_clients_opt,
                            timing: timing.to_timing()?,
                            client_authz: None,
                            policy: policy.as_ref().map(std::path::absolute).transpose()?,
                            audit: audit.as_ref().map(std::path::absolute).transpose()?,
                            gss: gss.to_opts()?,
                            interface: Some(interface),
                            budgets: budget_values,
                        },
                        size,
                        timeout: secs(timeout, "--timeout")?,
                        policy_text,
                        command,
                    },
                ));
            }
            let open_to_others = policy_text.is_some() || policy.is_some();
            Ok(start(StartOpts {
                open_to_others,
                size: size.unwrap_or(1),
                fanout,
                tcp,
                port,
                rundir,
                broker_path,
                timeout: secs(timeout, "--timeout")?,
                keep_going,
                policy_text,
                broker_args,
                command,
            })?)
        }
        Cmd::Config {
            cmd: ConfigCmd::Check { path, host, user },
        } => {
            out!("{}", tools::config_check(&path)?);
            let Some(host) = host else {
                outln!("{}: ok", path.display());
                return Ok(0);
            };
            let (uname, uid) = match user {
                Some(u) => {
                    let pw = nix::unistd::User::from_name(&u)?.ok_or_else(|| {
                        anyhow::anyhow!(
                            "no user {u} on this host; name the user the broker runs as (--user)"
                        )
                    })?;
                    (u, pw.uid.as_raw())
                }
                None => match nix::unistd::User::from_name("canopy")? {
                    Some(pw) => ("canopy".to_string(), pw.uid.as_raw()),
                    None => {
                        let me = nix::unistd::getuid();
                        let name = nix::unistd::User::from_uid(me)?
                            .map(|p| p.name)
                            .unwrap_or_else(|| format!("uid {me}"));
                        (name, me.as_raw())
                    }
                },
            };
            let config = canopy_config::Config::load(&path)?;
            let findings = canopy_broker::hostcheck::check(&config, &host, (&uname, uid))
                .map_err(anyhow::Error::msg)?;
            let mut problems = 0;
            for f in &findings {
                if f.ok {
                    outln!("ok: {}", f.text);
                } else {
                    problems += 1;
                    outln!("problem: {}", f.text);
                }
            }
            if problems == 0 {
                outln!(
                    "{}: ok for {host} (broker running as {uname})",
                    path.display()
                );
                Ok(0)
            } else {
                outln!("{}: {problems} problem(s) for {host}", path.display());
                Ok(1)
            }
        }
        Cmd::Broker(args) => broker_cmd::run(args),
        Cmd::Cert { cmd } => cert_cli::run(cmd),
        Cmd::Receipt { cmd } => receipt_cli::run(cmd),
        Cmd::GenerateManual { dir } => {
            for p in manual::generate(&dir)? {
                outln!("wrote {}", p.display());
            }
            Ok(0)
        }
        Cmd::Whoami { json, uri } => {
            let v = tools::whoami(uri.as_deref(), Duration::from_secs(10))?;
            if json {
                outln!("{v}");
            } else {
                let field = |k: &str| match &v[k] {
                    serde_json::Value::String(s) => s.clone(),
                    serde_json::Value::Null => "(none)".to_string(),
                    other => other.to_string(),
                };
                outln!("principal: {}", field("principal"));
                outln!("mechanism: {}", field("mechanism"));
                outln!("roles:     {}", field("roles"));
                if let Some(scoped) = v["scoped"].as_array().filter(|a| !a.is_empty()) {
                    for x in scoped {
                        outln!(
                            "           {} on {}",
                            x["roles"].as_str().unwrap_or("?"),
                            x["topics"].as_str().unwrap_or("?")
                        );
                    }
                }
                if let Some(reg) = v["register"].as_array().filter(|a| !a.is_empty()) {
                    let names: Vec<&str> = reg.iter().filter_map(|x| x.as_str()).collect();
                    outln!("register:  {}", names.join(", "));
                }
                outln!("rule:      {}", field("rule"));
                outln!("reason:    {}", field("reason"));
            }
            Ok(0)
        }
        Cmd::Ping {
            rank,
            count,
            pad,
            interval,
            timeout,
            uri,
        } => {
            tools::ping(
                uri.as_deref(),
                rank,
                count,
                pad,
                secs(interval, "--interval")?,
                secs(timeout, "--timeout")?,
                &mut std::io::stdout(),
            )?;
            Ok(0)
        }
        Cmd::Keygen { path, name, public } => {
            use canopy_security::cert;
            if public {
                let c = cert::load_secret(&path)?;
                let kp = c
                    .keypair()
                    .context("secret certificate has no secret key")?;
                out!("{}", cert::public_text(&kp, c.name().unwrap_or("")));
                return Ok(0);
            }
            let name = match name {
                Some(n) => n,
                None => nix::unistd::gethostname()
                    .ok()
                    .and_then(|h| h.into_string().ok())
                    .unwrap_or_default(),
            };
            let kp = canopy_security::CurveKeypair::generate()?;
            let mut public_path = path.clone().into_os_string();
            public_path.push(".pub");
            cert::write_pair(&kp, &name, &path, std::path::Path::new(&public_path))?;
            outln!(
                "wrote {} (secret, mode 0600) and {} (public key {})",
                path.display(),
                PathBuf::from(&public_path).display(),
                kp.public_z85()
            );
            Ok(0)
        }
        Cmd::Key { cmd } => key_cmd(cmd),
        Cmd::Acl {
            cmd: AclCmd::Reload { uri },
        } => print_rank_results(tools::acl_reload(uri.as_deref(), Duration::from_secs(10))?),
        Cmd::Acl {
            cmd:
                AclCmd::Check {
                    principal,
                    address,
                    mechanism,
                    policy,
                    uri,
                },
        } => {
            let x = match policy {
                Some(p) => tools::acl_check_offline(
                    &p,
                    &principal,
                    mechanism.as_deref(),
                    address.as_deref(),
                )?,
                None => tools::acl_check_online(
                    uri.as_deref(),
                    &principal,
                    mechanism.as_deref(),
                    address.as_deref(),
                    Duration::from_secs(10),
                )?,
            };
            outln!(
                "{}: {} roles={} rule={} ({})",
                x.principal,
                if x.allow { "allow" } else { "deny" },
                x.roles,
                x.rule.as_deref().unwrap_or("default deny"),
                x.reason
            );
            if x.allow && (!x.scoped.is_empty() || !x.register.is_empty()) {
                outln!("roles per namespace:");
                for line in x.per_namespace() {
                    outln!("{line}");
                }
            }
            Ok(if x.allow { 0 } else { 2 })
        }
        Cmd::Audit {
            cmd: AuditCmd::Verify { file },
        } => match canopy_acl::audit::verify(&file) {
            Ok(n) => {
                outln!("{}: {n} entries, chain intact", file.display());
                Ok(0)
            }
            Err(e) => {
                outln!("{}: {e}", file.display());
                Ok(1)
            }
        },
        Cmd::Overlay {
            cmd: OverlayCmd::Disconnect { rank, uri },
        } => {
            let parent = tools::disconnect(uri.as_deref(), rank, Duration::from_secs(10))?;
            outln!("rank {rank} disconnected from rank {parent}");
            Ok(0)
        }
        Cmd::Overlay {
            cmd:
                OverlayCmd::Status {
                    rank,
                    json,
                    wait,
                    timeout,
                    uri,
                },
        } => {
            let r = match wait {
                Some(want) => {
                    let t: f64 = timeout.trim_end_matches('s').parse().with_context(|| {
                        format!("--timeout {timeout}: expected seconds, e.g. 10s")
                    })?;
                    match tools::wait_health(uri.as_deref(), rank, &want, secs(t, "--timeout")?)? {
                        Ok(r) => r,
                        Err(r) => {
                            out!("{}", tools::render_status(&r));
                            canopy_broker::launcher::say(&format!(
                                "error: rank {rank}'s subtree is {}, not {want}, after {timeout}",
                                r.health
                            ));
                            return Ok(1);
                        }
                    }
                }
                None => tools::status(uri.as_deref(), rank, Duration::from_secs(10))?,
            };
            if json {
                outln!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                out!("{}", tools::render_status(&r));
            }
            Ok(0)
        }
        Cmd::Event {
            cmd:
                EventCmd::Pub {
                    topic,
                    payload,
                    uri,
                },
        } => {
            let seq = tools::event_pub(
                uri.as_deref(),
                &topic,
                payload.unwrap_or_default().as_bytes(),
                Duration::from_secs(10),
            )?;
            outln!("published {topic} seq={seq}");
            Ok(0)
        }
        Cmd::Exec {
            ranks,
            label_io,
            dir,
            env,
            no_stdin,
            receipts,
            lifetime,
            sign,
            delegate,
            out,
            submit,
            as_service,
            uri,
            command,
        } => {
            let cwd = match dir {
                Some(d) => d,
                None => std::env::current_dir()
                    .context("cannot read the current directory; pass --dir")?
                    .display()
                    .to_string(),
            };
            let mut pairs = Vec::new();
            for kv in env {
                let Some((k, v)) = kv.split_once('=') else {
                    anyhow::bail!("--env {kv:?} is not K=V; write it as NAME=VALUE");
                };
                if k.is_empty() {
                    anyhow::bail!("--env {kv:?} has an empty name; write it as NAME=VALUE");
                }
                pairs.push((k.to_string(), v.to_string()));
            }
            let args = canopy_broker::exec_cli::ExecArgs {
                ranks,
                argv: command,
                cwd,
                env: pairs,
                label_io,
                stdin: !no_stdin,
                receipts,
                lifetime,
                sign,
                delegate,
                out,
                submit,
                as_service,
            };
            use canopy_broker::exec_cli::{self, ExecError};
            use canopy_imp::userkeys::UserKeyError;
            match exec_cli::run(uri.as_deref(), args.clone()) {
                // The first exec in a system instance (or one after the
                // certificate expired): ask the site CA, then go on.
                Err(ExecError::Identity(
                    e @ (UserKeyError::Missing { .. } | UserKeyError::Expired { .. }),
                )) => {
                    eprintln!("canopy exec: {e}; asking the site ca now");
                    cert_cli::request(uri.as_deref(), None, None, Duration::from_secs(10), true)?;
                    Ok(exec_cli::run(uri.as_deref(), args)?)
                }
                r => Ok(r?),
            }
        }
        Cmd::Rpc {
            topic,
            payload,
            rank,
            timeout,
            uri,
        } => {
            let body = match payload.as_deref() {
                Some("-") => {
                    let mut b = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                        .context("reading the payload from standard input")?;
                    b
                }
                Some(p) => p.as_bytes().to_vec(),
                None => Vec::new(),
            };
            let t = secs(timeout, "--timeout")?;
            let reply = tools::rpc(uri.as_deref(), &topic, rank, &body, t)?;
            let mut out = std::io::stdout();
            if let Err(e) = std::io::Write::write_all(&mut out, &reply)
                .and_then(|()| {
                    if reply.last() != Some(&b'\n') && !reply.is_empty() {
                        std::io::Write::write_all(&mut out, b"\n")
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| std::io::Write::flush(&mut out))
            {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e).context("writing the response");
                }
            }
            Ok(0)
        }
        Cmd::Service {
            cmd: ServiceCmd::List { rank, json, uri },
        } => {
            let lists =
                tools::service_list(uri.as_deref(), rank.as_deref(), Duration::from_secs(10))?;
            for v in lists {
                if json {
                    outln!("{v}");
                    continue;
                }
                outln!("rank {}:", v["rank"]);
                for s in v["services"].as_array().into_iter().flatten() {
                    let methods: Vec<String> = s["methods"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(m, r)| format!("{m}({})", r.as_str().unwrap_or("?")))
                        .collect();
                    let waiting = s["outstanding"].as_u64().unwrap_or(0);
                    let waiting = if waiting > 0 {
                        format!(" [{waiting} waiting]")
                    } else {
                        String::new()
                    };
                    outln!(
                        "  {:<10} {:<24} {}{waiting}",
                        s["namespace"].as_str().unwrap_or("?"),
                        s["provider"].as_str().unwrap_or("?"),
                        methods.join(" ")
                    );
                }
            }
            Ok(0)
        }
        Cmd::Event {
            cmd:
                EventCmd::Sub {
                    pattern,
                    count,
                    timeout,
                    uri,
                },
        } => {
            let t = timeout.map(|t| secs(t, "--timeout")).transpose()?;
            tools::event_sub(uri.as_deref(), &pattern, count, t, &mut std::io::stdout())?;
            Ok(0)
        }
    }
}

/// A policy file for `canopy start --allow PRINCIPAL=ROLE ...`.
fn policy_from_allow(allow: &[String]) -> Result<String> {
    let mut out = String::from("# generated by canopy start --allow\n");
    for (i, a) in allow.iter().enumerate() {
        let (principal, role) = a
            .rsplit_once('=')
            .with_context(|| format!("--allow {a}: expected PRINCIPAL=ROLE, e.g. unix:bob=user"))?;
        // The message says which role is unknown and lists the roles (the
        // main error printer shows only the outermost message).
        canopy_proto::Roles::parse_list(role).map_err(|e| anyhow::anyhow!("--allow {a}: {e}"))?;
        let roles: Vec<String> = role.split(',').map(|r| format!("{:?}", r.trim())).collect();
        out.push_str(&format!(
            "\n[[rule]]\nname = \"allow-{}\"\nprincipal = {:?}\nroles = [{}]\n",
            i + 1,
            principal,
            roles.join(", ")
        ));
    }
    canopy_acl::Acl::parse(&out, "--allow").map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(out)
}

fn print_rank_results(results: Vec<tools::RankResult>) -> Result<i32> {
    let mut failed = 0;
    for (rank, r) in results {
        match r {
            Ok(msg) => outln!("rank {rank}: {msg}"),
            Err(e) => {
                failed += 1;
                outln!("rank {rank}: refused: {e}");
            }
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

fn key_cmd(cmd: KeyCmd) -> Result<i32> {
    use canopy_broker::rotate;
    let t = Duration::from_secs(10);
    let load =
        |p: &std::path::Path| canopy_config::Config::load(p).map_err(|e| anyhow::anyhow!("{e}"));
    match cmd {
        KeyCmd::Init { config, owner } => {
            let cfg = load(&config)?;
            let owner = match owner {
                Some(u) => {
                    let pw = nix::unistd::User::from_name(&u)?.ok_or_else(|| {
                        anyhow::anyhow!("no user {u} on this host; create it first (the Debian package creates canopy), or name another with --owner")
                    })?;
                    Some((pw.uid.as_raw(), pw.gid.as_raw()))
                }
                None => None,
            };
            let written = rotate::init_keys(&cfg, owner)?;
            for (host, secret, public) in &written {
                outln!(
                    "{host}: {} (secret, mode 0600), {}",
                    secret.display(),
                    public.display()
                );
            }
            outln!(
                "wrote {} key pairs; copy each secret certificate to its host only, and the public certificates to every host",
                written.len()
            );
            Ok(0)
        }
        KeyCmd::New { host, config } => {
            let cfg = load(&config)?;
            let (rank, sn, pn, key) = rotate::write_next(&cfg, &host)?;
            outln!(
                "wrote {} (secret, mode 0600) and {} (public key {key}) for rank {rank}",
                sn.display(),
                pn.display()
            );
            outln!("next: copy the public certificate to every node if its directory is not shared, then `canopy key reload`");
            Ok(0)
        }
        KeyCmd::Reload { uri } => print_rank_results(tools::key_reload(uri.as_deref(), t)?),
        KeyCmd::Switch { host, config, uri } => {
            let cfg = load(&config)?;
            let (rank, _, public) = rotate::host_paths(&cfg, &host)?;
            // The next key, if its public certificate is here to check the
            // neighbours against.
            let next = rotate::load_public_key(&rotate::next_path(&public))
                .ok()
                .map(|k| canopy_security::z85::encode(&k));
            let (reply, st, took) = tools::key_switch(
                uri.as_deref(),
                rank,
                next.as_deref(),
                t,
                Duration::from_secs(30),
            )?;
            outln!("{reply}");
            if st.settled() {
                outln!(
                    "rank {rank}: links moved to key {} in {:.1} ms",
                    st.public_key,
                    took.as_secs_f64() * 1e3
                );
                Ok(0)
            } else {
                outln!(
                    "rank {rank}: links still moving after {:.1} s (parent moving: {}, children moving: {:?}, rebinding: {}); see its log",
                    took.as_secs_f64(),
                    st.parent_moving,
                    st.children_moving,
                    st.rebinding
                );
                Ok(1)
            }
        }
        KeyCmd::Retire {
            host,
            config,
            force,
            no_reload,
            uri,
        } => {
            let cfg = load(&config)?;
            let (rank, _, public) = rotate::host_paths(&cfg, &host)?;
            if !force && !no_reload {
                let next = rotate::load_public_key(&rotate::next_path(&public))?;
                let next = canopy_security::z85::encode(&next);
                let used = tools::key_in_use(uri.as_deref(), rank, t)?;
                anyhow::ensure!(
                    used == next,
                    "rank {rank} ({host}) still uses key {used}, not its next key {next}: run `canopy key switch {host}` first (or --force)"
                );
            }
            for p in rotate::promote_next(&cfg, &host)? {
                outln!("{}: now holds the new key", p.display());
            }
            if no_reload {
                return Ok(0);
            }
            print_rank_results(tools::key_reload(uri.as_deref(), t)?)
        }
    }
}
