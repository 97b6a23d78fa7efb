//! PMIx (`srun --mpi=pmix`, Open MPI's launchers) through libpmix: init,
//! put, commit, fence, get, finalize, abort. The C side
//! (`csrc/pmix_shim.c`) keeps PMIx's structs out of Rust, so each call
//! crosses the boundary with C strings and integers only.
//!
//! Built only where libpmix's headers were found at build time
//! (`cfg(canopy_pmix)`); otherwise [`Pmix::init`] fails with
//! [`PmixError::NotBuilt`], which says how to fix it.

use std::fmt;

/// What went wrong in a PMIx call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PmixError {
    /// This build has no PMIx support.
    NotBuilt,
    /// libpmix could not be loaded at run time (it is loaded only for a
    /// PMIx launch).
    NotLoaded(String),
    /// A PMIx call returned an error status.
    Status {
        call: &'static str,
        rc: i32,
        text: String,
    },
    /// `get`: no process put this key (before the last fence).
    NotFound,
    /// `fence`: the timeout passed.
    Timeout,
    /// `get`: the value is not a string.
    NotAString,
    /// A key or value holds a NUL byte.
    Nul,
    /// `get`: the value is longer than [`MAX_VALUE`].
    TooLong,
}

impl fmt::Display for PmixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PmixError::NotBuilt => f.write_str("this canopy was built without libpmix, so it cannot speak pmix; install libpmix-dev and rebuild, or run `srun --mpi=pmi2 ...`"),
            PmixError::NotLoaded(why) => write!(f, "cannot load libpmix ({why}); install libpmix2, or run `srun --mpi=pmi2 ...`"),
            PmixError::Status { call, rc, text } => write!(f, "{call} failed: {text} ({rc})"),
            PmixError::NotFound => f.write_str("the key is not in the job's data"),
            PmixError::Timeout => f.write_str("the operation timed out"),
            PmixError::NotAString => f.write_str("the value is not a string"),
            PmixError::Nul => f.write_str("a key or value holds a NUL byte"),
            PmixError::TooLong => write!(f, "the value is longer than {MAX_VALUE} bytes"),
        }
    }
}

impl std::error::Error for PmixError {}

/// Longest value [`Pmix::get`] returns.
pub const MAX_VALUE: usize = 4096;

/// An initialized PMIx client (one per process); finalized on drop unless
/// [`Pmix::finalize`] ran.
#[derive(Debug)]
pub struct Pmix {
    pub rank: u32,
    pub size: u32,
    /// The job's namespace (`slurm.pmix.12.0`).
    pub nspace: String,
    finalized: bool,
}

#[cfg(canopy_pmix)]
mod ffi {
    use std::os::raw::{c_char, c_int};
    extern "C" {
        pub fn canopy_pmix_init(
            rank: *mut u32,
            size: *mut u32,
            nspace: *mut c_char,
            nlen: usize,
        ) -> c_int;
        pub fn canopy_pmix_put(key: *const c_char, value: *const c_char) -> c_int;
        pub fn canopy_pmix_commit() -> c_int;
        pub fn canopy_pmix_fence(timeout_s: c_int) -> c_int;
        pub fn canopy_pmix_get(
            rank: u32,
            key: *const c_char,
            buf: *mut c_char,
            len: usize,
        ) -> c_int;
        pub fn canopy_pmix_finalize() -> c_int;
        pub fn canopy_pmix_abort(code: c_int, msg: *const c_char) -> c_int;
        pub fn canopy_pmix_not_found() -> c_int;
        pub fn canopy_pmix_timeout() -> c_int;
        pub fn canopy_pmix_error(rc: c_int) -> *const c_char;
        pub fn canopy_pmix_not_loaded() -> c_int;
        pub fn canopy_pmix_load_error() -> *const c_char;
    }
}

#[cfg(canopy_pmix)]
mod imp {
    use super::{ffi, PmixError, MAX_VALUE};
    use std::ffi::{CStr, CString};

    pub fn status(call: &'static str, rc: i32) -> Result<(), PmixError> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: plain integer calls with no arguments to check.
        if rc == unsafe { ffi::canopy_pmix_not_found() } {
            return Err(PmixError::NotFound);
        }
        // SAFETY: as above.
        if rc == unsafe { ffi::canopy_pmix_not_loaded() } {
            // SAFETY: a static NUL-terminated buffer the shim filled before
            // returning this status.
            let why = unsafe { CStr::from_ptr(ffi::canopy_pmix_load_error()) };
            return Err(PmixError::NotLoaded(why.to_string_lossy().into_owned()));
        }
        // SAFETY: as above.
        if rc == unsafe { ffi::canopy_pmix_timeout() } {
            return Err(PmixError::Timeout);
        }
        // SAFETY: PMIx_Error_string returns a static string (never freed)
        // for any status, or NULL.
        let p = unsafe { ffi::canopy_pmix_error(rc) };
        let text = if p.is_null() {
            "unknown error".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, static.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        };
        Err(PmixError::Status { call, rc, text })
    }

    fn cstr(s: &str) -> Result<CString, PmixError> {
        CString::new(s).map_err(|_| PmixError::Nul)
    }

    pub fn init() -> Result<(u32, u32, String), PmixError> {
        let (mut rank, mut size) = (0u32, 0u32);
        let mut ns = vec![0u8; 512];
        // SAFETY: the pointers are valid for the call; the shim writes at
        // most `ns.len()` bytes, NUL-terminated (snprintf).
        let rc = unsafe {
            ffi::canopy_pmix_init(&mut rank, &mut size, ns.as_mut_ptr().cast(), ns.len())
        };
        status("PMIx_Init", rc)?;
        let end = ns.iter().position(|b| *b == 0).unwrap_or(ns.len());
        Ok((rank, size, String::from_utf8_lossy(&ns[..end]).into_owned()))
    }

    pub fn put(key: &str, value: &str) -> Result<(), PmixError> {
        let (k, v) = (cstr(key)?, cstr(value)?);
        // SAFETY: both are valid NUL-terminated strings for the call;
        // PMIx_Put copies them.
        status("PMIx_Put", unsafe {
            ffi::canopy_pmix_put(k.as_ptr(), v.as_ptr())
        })
    }

    pub fn commit() -> Result<(), PmixError> {
        // SAFETY: no arguments.
        status("PMIx_Commit", unsafe { ffi::canopy_pmix_commit() })
    }

    pub fn fence(timeout_s: i32) -> Result<(), PmixError> {
        // SAFETY: an integer argument.
        status("PMIx_Fence", unsafe { ffi::canopy_pmix_fence(timeout_s) })
    }

    pub fn get(rank: u32, key: &str) -> Result<String, PmixError> {
        let k = cstr(key)?;
        let mut buf = vec![0u8; MAX_VALUE + 1];
        // SAFETY: `k` is NUL-terminated; the shim writes at most
        // `buf.len()` bytes, NUL included.
        let rc =
            unsafe { ffi::canopy_pmix_get(rank, k.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        match rc {
            -1000 => return Err(PmixError::NotAString),
            -1001 => return Err(PmixError::TooLong),
            _ => status("PMIx_Get", rc)?,
        }
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        Ok(String::from_utf8_lossy(&buf[..end]).into_owned())
    }

    pub fn finalize() -> Result<(), PmixError> {
        // SAFETY: no arguments.
        status("PMIx_Finalize", unsafe { ffi::canopy_pmix_finalize() })
    }

    pub fn abort(code: i32, msg: &str) -> Result<(), PmixError> {
        let m = cstr(msg).unwrap_or_default();
        // SAFETY: `m` is NUL-terminated for the call.
        status("PMIx_Abort", unsafe {
            ffi::canopy_pmix_abort(code, m.as_ptr())
        })
    }
}

#[cfg(not(canopy_pmix))]
mod imp {
    use super::PmixError;
    pub fn init() -> Result<(u32, u32, String), PmixError> {
        Err(PmixError::NotBuilt)
    }
    pub fn put(_: &str, _: &str) -> Result<(), PmixError> {
        Err(PmixError::NotBuilt)
    }
    pub fn commit() -> Result<(), PmixError> {
        Err(PmixError::NotBuilt)
    }
    pub fn fence(_: i32) -> Result<(), PmixError> {
        Err(PmixError::NotBuilt)
    }
    pub fn get(_: u32, _: &str) -> Result<String, PmixError> {
        Err(PmixError::NotBuilt)
    }
    pub fn finalize() -> Result<(), PmixError> {
        Err(PmixError::NotBuilt)
    }
    pub fn abort(_: i32, _: &str) -> Result<(), PmixError> {
        Err(PmixError::NotBuilt)
    }
}

static INITIALIZED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl Pmix {
    /// Whether this build speaks PMIx.
    pub const BUILT: bool = cfg!(canopy_pmix);

    /// Connects to the PMIx server that started this process (`PMIx_Init`)
    /// and reads the job size. Once per process.
    pub fn init() -> Result<Pmix, PmixError> {
        if !Pmix::BUILT {
            return Err(PmixError::NotBuilt);
        }
        if INITIALIZED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(PmixError::Status {
                call: "PMIx_Init",
                rc: 0,
                text: "already initialized in this process".into(),
            });
        }
        let (rank, size, nspace) = imp::init()?;
        Ok(Pmix {
            rank,
            size,
            nspace,
            finalized: false,
        })
    }

    /// Stores `key`=`value` for every process (`PMIx_Put`, global scope).
    pub fn put(&mut self, key: &str, value: &str) -> Result<(), PmixError> {
        imp::put(key, value)
    }

    /// Makes the puts visible at the next fence (`PMIx_Commit`).
    pub fn commit(&mut self) -> Result<(), PmixError> {
        imp::commit()
    }

    /// Waits for every process, collecting the data (`PMIx_Fence`);
    /// `timeout_s` 0 waits forever.
    pub fn fence(&mut self, timeout_s: i32) -> Result<(), PmixError> {
        imp::fence(timeout_s)
    }

    /// A string `rank` put (`PMIx_Get`).
    pub fn get(&mut self, rank: u32, key: &str) -> Result<String, PmixError> {
        imp::get(rank, key)
    }

    /// `PMIx_Finalize`; later calls fail.
    pub fn finalize(&mut self) -> Result<(), PmixError> {
        if self.finalized {
            return Ok(());
        }
        self.finalized = true;
        imp::finalize()
    }

    /// Asks the launcher to end the job (`PMIx_Abort`).
    pub fn abort(&mut self, code: i32, msg: &str) -> Result<(), PmixError> {
        imp::abort(code, msg)
    }
}

impl Drop for Pmix {
    fn drop(&mut self) {
        let _ = self.finalize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_built_says_how_to_fix_it() {
        let msg = PmixError::NotBuilt.to_string();
        assert!(
            msg.contains("libpmix-dev") && msg.contains("--mpi=pmi2"),
            "{msg}"
        );
    }

    /// Outside a PMIx job, init fails (no server), never crashes.
    #[test]
    fn init_without_a_server_fails_cleanly() {
        if std::env::var_os("PMIX_NAMESPACE").is_some() {
            return;
        }
        assert!(Pmix::init().is_err());
    }
}
