//! What the numbers were measured on.

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// CPUs this process may run on (what `nproc` prints).
    pub nproc: usize,
    /// `processor` entries in /proc/cpuinfo.
    pub cpus_online: Option<usize>,
    pub cpu_model: String,
    pub kernel: String,
    pub libzmq: String,
    /// /proc/loadavg when the report started: is the machine quiet?
    pub loadavg: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let (maj, min, pat) = zmq::version();
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpus_online: Some(
                cpuinfo
                    .lines()
                    .filter(|l| key(l) == Some("processor"))
                    .count(),
            )
            .filter(|n| *n > 0),
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            libzmq: format!("{maj}.{min}.{pat}"),
            loadavg: read_trim("/proc/loadavg")
                .split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" "),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "machine: nproc {}{}, CPU \"{}\", kernel {}, libzmq {}, loadavg {}",
            self.nproc,
            match self.cpus_online {
                Some(n) if n != self.nproc => format!(" (of {n} online)"),
                _ => String::new(),
            },
            self.cpu_model,
            self.kernel,
            self.libzmq,
            self.loadavg
        )
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn key(line: &str) -> Option<&str> {
    line.split_once(':').map(|(k, _)| k.trim())
}

/// The CPU model from /proc/cpuinfo text (x86 `model name`; other
/// architectures' nearest equivalents).
pub fn cpu_model(cpuinfo: &str) -> Option<String> {
    for want in [
        "model name",
        "Model",
        "cpu model",
        "Hardware",
        "cpu",
        "uarch",
    ] {
        if let Some(v) = cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == want && !v.trim().is_empty()).then(|| v.trim().to_string())
        }) {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_name() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(cpu_model(x86).as_deref(), Some("AMD EPYC 7B13"));
        assert_eq!(cpu_model("processor : 0\n"), None);
    }
}
