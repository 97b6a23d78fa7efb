//! Trusted files: the rule OpenSSH's `StrictModes` applies to
//! `authorized_keys`, for every file or directory whose contents decide
//! access (policy files, certificates and their directories, keytabs, the
//! audit log's directory, the runtime directory).
//!
//! [`check_trusted`] accepts a path when
//!
//! * it is owned by root or by the service's own user;
//! * group and other cannot write it;
//! * for secrets ([`TrustKind::Secret`]: CURVE secret certificates,
//!   keytabs), group and other cannot read it either;
//! * every directory on its path, up to `/`, is owned by root or the
//!   service's user and cannot be written by group or other, except that a
//!   directory with the sticky bit (`/tmp`) may be: there only an entry's
//!   owner (or root) can rename or remove it, so nothing we own can be
//!   swapped;
//! * symbolic links on the way are followed only when they are owned by
//!   root or the service's user (anyone else could point them elsewhere),
//!   and the directories they lead through are checked in turn; a
//!   [`TrustKind::RuntimeDir`] must not be a symlink itself.
//!
//! [`create_private_dir`] creates a directory of mode 0700 and checks,
//! through a descriptor opened with `O_NOFOLLOW | O_DIRECTORY`, that what
//! was created is a directory owned by the user with mode 0700.
//!
//! Every refusal names the path, what was found, and the command that
//! fixes it.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, Metadata};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;

/// Most symbolic links followed while resolving one path (as Linux's
/// `MAXSYMLINKS`).
pub const MAX_SYMLINKS: usize = 40;

/// What kind of file is being trusted, which decides the checks on the
/// final component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustKind {
    /// A regular file whose contents decide access (policy file, public
    /// certificate, configuration file): not writable by group or other.
    File,
    /// A secret regular file (CURVE secret certificate, keytab): neither
    /// readable nor writable by group or other.
    Secret,
    /// A directory whose entries decide access (`curve_public_certs`, a
    /// configuration directory, the audit log's directory): not writable by
    /// group or other, sticky or not.
    Directory,
    /// A directory in which private runtime directories are made
    /// (`--rundir`): must not be a symlink; not writable by group or other
    /// unless it has the sticky bit (as `/tmp`).
    RuntimeDir,
}

impl TrustKind {
    fn what(self) -> &'static str {
        match self {
            TrustKind::File => "file",
            TrustKind::Secret => "secret file",
            TrustKind::Directory => "directory",
            TrustKind::RuntimeDir => "runtime directory",
        }
    }
}

/// A path that passed [`check_trusted`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedFile {
    /// The path as given.
    pub path: PathBuf,
    /// The path with every symlink resolved.
    pub canonical: PathBuf,
    /// Owner of the final component.
    pub uid: u32,
    /// Permission bits of the final component (`0o7777` mask).
    pub mode: u32,
    dev: u64,
    ino: u64,
}

impl TrustedFile {
    /// Whether `meta` (e.g. from `File::metadata` of a file opened by its
    /// path) describes the file that was checked.
    pub fn same_file(&self, meta: &Metadata) -> bool {
        meta.dev() == self.dev && meta.ino() == self.ino
    }

    /// Open the checked file for reading, refusing it if the canonical path
    /// is now a symlink or names another file than the one checked (it was
    /// replaced after the check).
    pub fn open(&self) -> Result<File, TrustError> {
        let flags = OFlag::O_NOFOLLOW.bits() | OFlag::O_CLOEXEC.bits();
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(&self.canonical)
            .map_err(|source| TrustError::Io {
                path: self.canonical.clone(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| TrustError::Io {
            path: self.canonical.clone(),
            source,
        })?;
        if !self.same_file(&meta) {
            return Err(TrustError::Replaced {
                path: self.canonical.clone(),
            });
        }
        Ok(file)
    }
}

/// A directory made by [`create_private_dir`], with the descriptor that was
/// checked.
#[derive(Debug)]
pub struct PrivateDir {
    pub path: PathBuf,
    pub dir: File,
}

/// A user, shown by name when it has one (for the commands in messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uid(pub u32);

impl fmt::Display for Uid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(self.0)) {
            Ok(Some(u)) => f.write_str(&u.name),
            _ => write!(f, "{}", self.0),
        }
    }
}

/// Why a path is not trusted. Messages name the path, what was found and
/// the command that fixes it.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot check {path}: {source}; check that it exists and that every directory on its path can be searched by this user")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path} is owned by {owner} (uid {}), not by root or {service} (uid {}); run `chown {service} {path}` as root, or move it somewhere only {service} or root can change", owner.0, service.0)]
    Owner {
        what: &'static str,
        path: PathBuf,
        owner: Uid,
        service: Uid,
    },
    #[error("directory {path}, on the path of {target}, is owned by {owner} (uid {}), who can replace what is in it; run `chown root {path}` as root, or keep {target} elsewhere", owner.0)]
    DirOwner {
        path: PathBuf,
        target: PathBuf,
        owner: Uid,
    },
    #[error(
        "{what} {path} is writable by group or other (mode {mode:04o}); run `chmod go-w {path}`"
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error("directory {path}, on the path of {target}, is writable by group or other (mode {mode:04o}); run `chmod go-w {path}`, or keep {target} elsewhere")]
    DirWritable {
        path: PathBuf,
        target: PathBuf,
        mode: u32,
    },
    #[error("{what} {path} is shared (mode {mode:04o}: anyone can add entries to it); use a directory that only its owner can write, e.g. `install -d -m 0755 -o {service} /var/lib/canopy`")]
    Shared {
        what: &'static str,
        path: PathBuf,
        mode: u32,
        service: Uid,
    },
    #[error("secret file {path} can be read or written by group or other (mode {mode:04o}); run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("symlink {path} (on the path of {target}) is owned by {owner} (uid {}), who can point it anywhere; replace it with the real path (`ln -sfn` as root) or give the real path instead", owner.0)]
    SymlinkOwner {
        path: PathBuf,
        target: PathBuf,
        owner: Uid,
    },
    #[error(
        "{what} {path} is a symlink (to {dest}); give the real directory instead, e.g. {dest}"
    )]
    Symlink {
        what: &'static str,
        path: PathBuf,
        dest: PathBuf,
    },
    #[error("more than {MAX_SYMLINKS} symlinks while resolving {path}; fix the symlink loop")]
    Loop { path: PathBuf },
    #[error("{path} is not a regular file; point to the file itself")]
    NotAFile { path: PathBuf },
    #[error("{path} is not a directory; point to a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} was replaced after it was checked; check who else can write to its directory")]
    Replaced { path: PathBuf },
    #[error("{path} already exists; remove it (`rm -r {path}`) or choose another name")]
    Exists { path: PathBuf },
    #[error("private directory {path} is owned by {owner} (uid {}) with mode {mode:04o} after it was created, not by {service} with mode 0700; someone else can write to its parent: check it and remove {path}", owner.0)]
    NotPrivate {
        path: PathBuf,
        owner: Uid,
        service: Uid,
        mode: u32,
    },
    #[error("private directory {path} is owned by {owner} (uid {}) with mode {mode:04o}, not by {service} with mode 0700; if it is yours run `chmod 700 {path}`, else remove it (`rm -r {path}` as root) or choose another directory", owner.0)]
    ExistingNotPrivate {
        path: PathBuf,
        owner: Uid,
        service: Uid,
        mode: u32,
    },
}

/// The effective uid of this process: the "service user" of a broker.
pub fn service_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrustError + '_ {
    move |source| TrustError::Io {
        path: path.to_owned(),
        source,
    }
}

fn trusted_owner(uid: u32, service_uid: u32) -> bool {
    uid == 0 || uid == service_uid
}

/// A directory met on the way to `target` (not the final component).
fn check_dir_on_path(
    dir: &Path,
    meta: &Metadata,
    target: &Path,
    service_uid: u32,
) -> Result<(), TrustError> {
    if !trusted_owner(meta.uid(), service_uid) {
        return Err(TrustError::DirOwner {
            path: dir.to_owned(),
            target: target.to_owned(),
            owner: Uid(meta.uid()),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(TrustError::DirWritable {
            path: dir.to_owned(),
            target: target.to_owned(),
            mode,
        });
    }
    Ok(())
}

fn check_final(
    path: &Path,
    meta: &Metadata,
    kind: TrustKind,
    service_uid: u32,
) -> Result<(), TrustError> {
    let what = kind.what();
    match kind {
        TrustKind::File | TrustKind::Secret if !meta.is_file() => {
            return Err(TrustError::NotAFile {
                path: path.to_owned(),
            })
        }
        TrustKind::Directory | TrustKind::RuntimeDir if !meta.is_dir() => {
            return Err(TrustError::NotADirectory {
                path: path.to_owned(),
            })
        }
        _ => {}
    }
    if !trusted_owner(meta.uid(), service_uid) {
        return Err(TrustError::Owner {
            what,
            path: path.to_owned(),
            owner: Uid(meta.uid()),
            service: Uid(service_uid),
        });
    }
    let mode = meta.mode() & 0o7777;
    let sticky_ok = kind == TrustKind::RuntimeDir && mode & 0o1000 != 0;
    if kind == TrustKind::Secret && mode & 0o077 != 0 {
        return Err(TrustError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    if mode & 0o022 != 0 && !sticky_ok {
        if meta.is_dir() && mode & 0o1000 != 0 {
            // `chmod go-w /tmp` would be bad advice.
            return Err(TrustError::Shared {
                what,
                path: path.to_owned(),
                mode,
                service: Uid(service_uid),
            });
        }
        return Err(TrustError::Writable {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Check that `path` can be trusted as `kind` by a service running as
/// `service_uid` (see the module documentation for the rules), resolving
/// symlinks component by component and checking every directory met.
pub fn check_trusted(
    path: &Path,
    kind: TrustKind,
    service_uid: u32,
) -> Result<TrustedFile, TrustError> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_err(io(path))?.join(path)
    };
    // Components still to walk, next one last.
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, &abs);
    let mut cur = PathBuf::from("/");
    let root = fs::metadata(&cur).map_err(io(&cur))?;
    check_dir_on_path(&cur, &root, path, service_uid)?;
    let mut links = 0;
    let mut last_meta = root;
    while let Some(name) = pending.pop() {
        if name == ".." {
            // `cur` holds no symlinks, so its parent is the real one.
            cur.pop();
            last_meta = fs::symlink_metadata(&cur).map_err(io(&cur))?;
            continue;
        }
        let next = cur.join(&name);
        let meta = fs::symlink_metadata(&next).map_err(io(&next))?;
        let is_last = pending.is_empty();
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Err(TrustError::Loop {
                    path: path.to_owned(),
                });
            }
            if !trusted_owner(meta.uid(), service_uid) {
                return Err(TrustError::SymlinkOwner {
                    path: next,
                    target: path.to_owned(),
                    owner: Uid(meta.uid()),
                });
            }
            let dest = fs::read_link(&next).map_err(io(&next))?;
            if is_last && kind == TrustKind::RuntimeDir {
                return Err(TrustError::Symlink {
                    what: kind.what(),
                    path: next,
                    dest: cur.join(dest),
                });
            }
            if dest.is_absolute() {
                cur = PathBuf::from("/");
            }
            push_components(&mut pending, &dest);
            continue;
        }
        if !is_last {
            if !meta.is_dir() {
                return Err(TrustError::NotADirectory { path: next });
            }
            check_dir_on_path(&next, &meta, path, service_uid)?;
        }
        cur = next;
        last_meta = meta;
    }
    // `last_meta` is the final component (or `/`, or what `..` led to).
    check_final(&cur, &last_meta, kind, service_uid)?;
    Ok(TrustedFile {
        path: path.to_owned(),
        canonical: cur,
        uid: last_meta.uid(),
        mode: last_meta.mode() & 0o7777,
        dev: last_meta.dev(),
        ino: last_meta.ino(),
    })
}

fn push_components(pending: &mut Vec<OsString>, path: &Path) {
    // Pushed in reverse so that `pop` yields them in order, in front of
    // what is already pending.
    let mut parts: Vec<OsString> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => parts.push(n.to_owned()),
            Component::ParentDir => parts.push(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    pending.extend(parts.into_iter().rev());
}

/// Create `path` as a private directory (mode 0700) for `service_uid`: its
/// parent must be a trusted [`TrustKind::RuntimeDir`], `path` must not
/// exist yet, and the directory is opened with `O_NOFOLLOW | O_DIRECTORY`
/// and checked through that descriptor (a directory owned by
/// `service_uid`, mode 0700), so that nothing planted in its place is used.
pub fn create_private_dir(path: &Path, service_uid: u32) -> Result<PrivateDir, TrustError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::env::current_dir().map_err(io(path))?,
    };
    check_trusted(&parent, TrustKind::RuntimeDir, service_uid)?;
    fs::DirBuilder::new()
        .mode(0o700)
        .create(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                TrustError::Exists {
                    path: path.to_owned(),
                }
            } else {
                TrustError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
    let flags = OFlag::O_NOFOLLOW.bits() | OFlag::O_DIRECTORY.bits() | OFlag::O_CLOEXEC.bits();
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
        .map_err(io(path))?;
    let meta = dir.metadata().map_err(io(path))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != service_uid || mode != 0o700 {
        return Err(TrustError::NotPrivate {
            path: path.to_owned(),
            owner: Uid(meta.uid()),
            service: Uid(service_uid),
            mode,
        });
    }
    Ok(PrivateDir {
        path: path.to_owned(),
        dir,
    })
}

/// Open an existing private directory: its parent must be a trusted
/// [`TrustKind::RuntimeDir`], `path` itself must not be a symlink (it is
/// opened with `O_NOFOLLOW | O_DIRECTORY`), and what was opened must be a
/// directory owned by `service_uid` that group and other cannot use (mode
/// `0700` or stricter). For a broker reusing the directory `canopy start`
/// made for it.
pub fn open_private_dir(path: &Path, service_uid: u32) -> Result<PrivateDir, TrustError> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => std::env::current_dir().map_err(io(path))?,
    };
    check_trusted(&parent, TrustKind::RuntimeDir, service_uid)?;
    let flags = OFlag::O_NOFOLLOW.bits() | OFlag::O_DIRECTORY.bits() | OFlag::O_CLOEXEC.bits();
    let dir = match fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)
    {
        Ok(d) => d,
        Err(source) => {
            // ELOOP (or ENOTDIR for a symlink to a file): say what it is.
            let owner = fs::symlink_metadata(path).map(|m| m.uid());
            return Err(match fs::read_link(path) {
                // Planted by someone else: never suggest following it.
                Ok(_)
                    if owner
                        .as_ref()
                        .is_ok_and(|u| !trusted_owner(*u, service_uid)) =>
                {
                    TrustError::SymlinkOwner {
                        path: path.to_owned(),
                        target: path.to_owned(),
                        owner: Uid(owner.unwrap_or_default()),
                    }
                }
                Ok(dest) => TrustError::Symlink {
                    what: "private directory",
                    path: path.to_owned(),
                    dest: parent.join(dest),
                },
                Err(_) => TrustError::Io {
                    path: path.to_owned(),
                    source,
                },
            });
        }
    };
    let meta = dir.metadata().map_err(io(path))?;
    let mode = meta.mode() & 0o7777;
    if !meta.is_dir() || meta.uid() != service_uid || mode & 0o077 != 0 {
        return Err(TrustError::ExistingNotPrivate {
            path: path.to_owned(),
            owner: Uid(meta.uid()),
            service: Uid(service_uid),
            mode,
        });
    }
    Ok(PrivateDir {
        path: path.to_owned(),
        dir,
    })
}

/// [`create_private_dir`], or [`open_private_dir`] if `path` exists.
pub fn ensure_private_dir(path: &Path, service_uid: u32) -> Result<PrivateDir, TrustError> {
    match create_private_dir(path, service_uid) {
        Err(TrustError::Exists { .. }) => open_private_dir(path, service_uid),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{lchown, symlink, PermissionsExt};

    const OTHER: u32 = 65534;

    fn chmod(p: &Path, mode: u32) {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn file(p: &Path, mode: u32) -> PathBuf {
        fs::write(p, "x").unwrap();
        chmod(p, mode);
        p.to_owned()
    }

    fn dir(p: &Path, mode: u32) -> PathBuf {
        fs::create_dir(p).unwrap();
        chmod(p, mode);
        p.to_owned()
    }

    /// Cases that chown to another uid need root.
    fn root() -> bool {
        if nix::unistd::geteuid().is_root() {
            true
        } else {
            eprintln!("skipped: needs root to give files to uid {OTHER}");
            false
        }
    }

    fn me() -> u32 {
        service_uid()
    }

    #[test]
    fn good_layouts_pass() {
        let t = tempfile::tempdir().unwrap();
        let d = dir(&t.path().join("etc"), 0o755);
        let policy = file(&d.join("policy.toml"), 0o644);
        let ok = check_trusted(&policy, TrustKind::File, me()).unwrap();
        assert_eq!(ok.canonical, fs::canonicalize(&policy).unwrap());
        assert_eq!(ok.mode, 0o644);
        let secret = file(&d.join("node0.key_secret"), 0o600);
        check_trusted(&secret, TrustKind::Secret, me()).unwrap();
        let ro = file(&d.join("krb5.keytab"), 0o400);
        check_trusted(&ro, TrustKind::Secret, me()).unwrap();
        check_trusted(&d, TrustKind::Directory, me()).unwrap();
        check_trusted(&d, TrustKind::RuntimeDir, me()).unwrap();
        // Root-owned files are trusted by any service user.
        if root() {
            check_trusted(&policy, TrustKind::File, 1000).unwrap();
        }
        // A relative path with `..` and `.` resolves to the same file.
        let rel = d.join("../etc/./policy.toml");
        let ok = check_trusted(&rel, TrustKind::File, me()).unwrap();
        assert_eq!(ok.canonical, fs::canonicalize(&policy).unwrap());
    }

    #[test]
    fn group_writable_file_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let p = file(&t.path().join("policy.toml"), 0o664);
        let e = check_trusted(&p, TrustKind::File, me()).unwrap_err();
        assert!(matches!(e, TrustError::Writable { mode: 0o664, .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("chmod go-w {}", p.display())),
            "{msg}"
        );
        assert!(msg.contains("0664"), "{msg}");
    }

    #[test]
    fn other_writable_dir_on_the_path_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = dir(&t.path().join("canopy"), 0o757);
        let inner = dir(&d.join("curve"), 0o755);
        let p = file(&inner.join("node1.key"), 0o644);
        let e = check_trusted(&p, TrustKind::File, me()).unwrap_err();
        match &e {
            TrustError::DirWritable { path, mode, .. } => {
                assert_eq!(path, &d);
                assert_eq!(*mode, 0o757);
            }
            other => panic!("expected DirWritable, got {other}"),
        }
        assert!(e
            .to_string()
            .contains(&format!("chmod go-w {}", d.display())));
        // The directory itself, as a directory whose entries decide access.
        let e = check_trusted(&d, TrustKind::Directory, me()).unwrap_err();
        assert!(matches!(e, TrustError::Writable { mode: 0o757, .. }), "{e}");
    }

    #[test]
    fn sticky_directories_on_the_path_pass_but_not_as_the_directory_itself() {
        let t = tempfile::tempdir().unwrap();
        let d = dir(&t.path().join("tmp"), 0o1777);
        let p = file(&d.join("policy.toml"), 0o644);
        check_trusted(&p, TrustKind::File, me()).unwrap();
        check_trusted(&d, TrustKind::RuntimeDir, me()).unwrap();
        let e = check_trusted(&d, TrustKind::Directory, me()).unwrap_err();
        assert!(matches!(e, TrustError::Shared { mode: 0o1777, .. }), "{e}");
        assert!(!e.to_string().contains("chmod go-w"), "{e}");
        assert!(e.to_string().contains("install -d -m 0755"), "{e}");
    }

    #[test]
    fn file_owned_by_another_user_is_refused() {
        if !root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let p = file(&t.path().join("policy.toml"), 0o644);
        std::os::unix::fs::chown(&p, Some(OTHER), None).unwrap();
        let e = check_trusted(&p, TrustKind::File, 0).unwrap_err();
        assert!(
            matches!(
                e,
                TrustError::Owner {
                    owner: Uid(OTHER),
                    ..
                }
            ),
            "{e}"
        );
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("chown root {}", p.display())),
            "{msg}"
        );
        // ... but it is trusted by the service running as that user.
        check_trusted(&p, TrustKind::File, OTHER).unwrap();
        // A directory on the path owned by another user.
        let d = dir(&t.path().join("theirs"), 0o755);
        std::os::unix::fs::chown(&d, Some(OTHER), None).unwrap();
        let q = file(&d.join("node1.key"), 0o644);
        let e = check_trusted(&q, TrustKind::File, 0).unwrap_err();
        assert!(
            matches!(&e, TrustError::DirOwner { path, .. } if path == &d),
            "{e}"
        );
    }

    #[test]
    fn symlink_in_another_users_directory_is_refused() {
        if !root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let good = file(&t.path().join("policy.toml"), 0o644);
        let theirs = dir(&t.path().join("home-mallory"), 0o755);
        let link = theirs.join("policy.toml");
        symlink(&good, &link).unwrap();
        std::os::unix::fs::chown(&theirs, Some(OTHER), None).unwrap();
        let e = check_trusted(&link, TrustKind::File, 0).unwrap_err();
        assert!(
            matches!(&e, TrustError::DirOwner { path, .. } if path == &theirs),
            "{e}"
        );

        // A symlink owned by another user, even in our own directory.
        let ours = dir(&t.path().join("etc"), 0o755);
        let link = ours.join("policy.toml");
        symlink(&good, &link).unwrap();
        lchown(&link, Some(OTHER), None).unwrap();
        let e = check_trusted(&link, TrustKind::File, 0).unwrap_err();
        assert!(
            matches!(&e, TrustError::SymlinkOwner { path, .. } if path == &link),
            "{e}"
        );
        assert!(e.to_string().contains(&link.display().to_string()));
    }

    #[test]
    fn trusted_symlinks_are_followed_and_their_targets_checked() {
        let t = tempfile::tempdir().unwrap();
        let real = dir(&t.path().join("real"), 0o755);
        let p = file(&real.join("policy.toml"), 0o644);
        let link = t.path().join("link");
        symlink("real", &link).unwrap();
        let ok = check_trusted(&link.join("policy.toml"), TrustKind::File, me()).unwrap();
        assert_eq!(ok.canonical, fs::canonicalize(&p).unwrap());
        // The target's directory is checked too.
        let bad = dir(&t.path().join("bad"), 0o777);
        file(&bad.join("policy.toml"), 0o644);
        let link2 = t.path().join("link2");
        symlink(&bad, &link2).unwrap();
        let e = check_trusted(&link2.join("policy.toml"), TrustKind::File, me()).unwrap_err();
        assert!(
            matches!(&e, TrustError::DirWritable { path, .. } if path == &bad),
            "{e}"
        );
        // A loop ends.
        let a = t.path().join("a");
        symlink("b", &a).unwrap();
        symlink("a", t.path().join("b")).unwrap();
        let e = check_trusted(&a, TrustKind::File, me()).unwrap_err();
        assert!(matches!(e, TrustError::Loop { .. }), "{e}");
    }

    #[test]
    fn symlink_as_rundir_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let real = dir(&t.path().join("run"), 0o700);
        let link = t.path().join("rundir");
        symlink(&real, &link).unwrap();
        let e = check_trusted(&link, TrustKind::RuntimeDir, me()).unwrap_err();
        assert!(
            matches!(&e, TrustError::Symlink { path, .. } if path == &link),
            "{e}"
        );
        assert!(e.to_string().contains(&real.display().to_string()), "{e}");
        // The same symlink is fine where the kind allows it.
        check_trusted(&link, TrustKind::Directory, me()).unwrap();
        // A rundir owned by someone else is refused.
        if root() {
            std::os::unix::fs::chown(&real, Some(OTHER), None).unwrap();
            let e = check_trusted(&real, TrustKind::RuntimeDir, 0).unwrap_err();
            assert!(matches!(e, TrustError::Owner { .. }), "{e}");
        }
    }

    #[test]
    fn readable_secrets_are_refused() {
        let t = tempfile::tempdir().unwrap();
        for name in ["node0.key_secret", "canopy.keytab"] {
            for mode in [0o640, 0o604, 0o644, 0o660, 0o610] {
                let p = t.path().join(format!("{name}.{mode:o}"));
                file(&p, mode);
                let e = check_trusted(&p, TrustKind::Secret, me()).unwrap_err();
                assert!(
                    matches!(&e, TrustError::Exposed { mode: m, .. } if *m == mode),
                    "{name} {mode:o}: {e}"
                );
                let msg = e.to_string();
                assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
                // The same mode is fine for a public file unless writable.
                assert_eq!(
                    check_trusted(&p, TrustKind::File, me()).is_ok(),
                    mode & 0o022 == 0
                );
            }
        }
    }

    #[test]
    fn kinds_need_the_right_file_type() {
        let t = tempfile::tempdir().unwrap();
        let f = file(&t.path().join("f"), 0o600);
        assert!(matches!(
            check_trusted(&f, TrustKind::Directory, me()),
            Err(TrustError::NotADirectory { .. })
        ));
        assert!(matches!(
            check_trusted(t.path(), TrustKind::File, me()),
            Err(TrustError::NotAFile { .. })
        ));
        assert!(matches!(
            check_trusted(&f.join("x"), TrustKind::File, me()),
            Err(TrustError::NotADirectory { .. })
        ));
        assert!(matches!(
            check_trusted(&t.path().join("missing"), TrustKind::File, me()),
            Err(TrustError::Io { .. })
        ));
    }

    #[test]
    fn open_refuses_a_file_replaced_after_the_check() {
        let t = tempfile::tempdir().unwrap();
        let p = file(&t.path().join("policy.toml"), 0o644);
        let ok = check_trusted(&p, TrustKind::File, me()).unwrap();
        ok.open().unwrap();
        let q = file(&t.path().join("other.toml"), 0o644);
        fs::rename(&q, &p).unwrap();
        assert!(matches!(ok.open(), Err(TrustError::Replaced { .. })));
    }

    #[test]
    fn private_dir_is_created_0700_and_checked() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("canopy-1");
        let made = create_private_dir(&p, me()).unwrap();
        let meta = made.dir.metadata().unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), me());
        // It exists now: never reused.
        assert!(matches!(
            create_private_dir(&p, me()),
            Err(TrustError::Exists { .. })
        ));
        // A symlink planted at the name is not followed.
        let target = dir(&t.path().join("elsewhere"), 0o700);
        let planted = t.path().join("canopy-2");
        symlink(&target, &planted).unwrap();
        assert!(matches!(
            create_private_dir(&planted, me()),
            Err(TrustError::Exists { .. })
        ));
        // An untrusted parent is refused before anything is created.
        let open = dir(&t.path().join("open"), 0o777);
        let e = create_private_dir(&open.join("canopy-3"), me()).unwrap_err();
        assert!(matches!(e, TrustError::Writable { .. }), "{e}");
        assert!(!open.join("canopy-3").exists());
        // What was created is checked through the descriptor: made by root
        // for a service running as another uid, it is not private to it.
        if root() {
            let e = create_private_dir(&t.path().join("canopy-4"), OTHER).unwrap_err();
            assert!(
                matches!(
                    e,
                    TrustError::NotPrivate {
                        owner: Uid(0),
                        mode: 0o700,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn existing_private_dirs_are_reused_only_when_private() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("canopy-1");
        ensure_private_dir(&p, me()).unwrap();
        ensure_private_dir(&p, me()).unwrap();
        open_private_dir(&p, me()).unwrap();
        chmod(&p, 0o750);
        let e = open_private_dir(&p, me()).unwrap_err();
        assert!(
            matches!(e, TrustError::ExistingNotPrivate { mode: 0o750, .. }),
            "{e}"
        );
        chmod(&p, 0o700);
        // A symlink to a private directory of ours is still refused.
        let link = t.path().join("canopy-link");
        symlink(&p, &link).unwrap();
        let e = ensure_private_dir(&link, me()).unwrap_err();
        assert!(
            matches!(&e, TrustError::Symlink { path, .. } if path == &link),
            "{e}"
        );
        if root() {
            // Someone else's directory is refused.
            std::os::unix::fs::chown(&p, Some(OTHER), None).unwrap();
            let e = open_private_dir(&p, 0).unwrap_err();
            assert!(
                matches!(
                    e,
                    TrustError::ExistingNotPrivate {
                        owner: Uid(OTHER),
                        ..
                    }
                ),
                "{e}"
            );
            // A parent owned by someone else is refused before anything else.
            let theirs = dir(&t.path().join("theirs"), 0o755);
            std::os::unix::fs::chown(&theirs, Some(OTHER), None).unwrap();
            let e = ensure_private_dir(&theirs.join("canopy-2"), 0).unwrap_err();
            assert!(matches!(e, TrustError::Owner { .. }), "{e}");
            assert!(!theirs.join("canopy-2").exists());
        }
    }

    #[test]
    fn a_private_dir_planted_as_someone_elses_symlink_is_not_followed() {
        if !root() {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let theirs = dir(&t.path().join("theirs"), 0o700);
        std::os::unix::fs::chown(&theirs, Some(OTHER), None).unwrap();
        let planted = t.path().join("canopy-1");
        symlink(&theirs, &planted).unwrap();
        lchown(&planted, Some(OTHER), None).unwrap();
        let e = ensure_private_dir(&planted, 0).unwrap_err();
        assert!(
            matches!(&e, TrustError::SymlinkOwner { path, owner: Uid(OTHER), .. } if path == &planted),
            "{e}"
        );
        // The message does not suggest using their directory.
        assert!(!e.to_string().contains("e.g."), "{e}");
    }
}
