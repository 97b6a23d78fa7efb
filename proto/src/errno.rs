//! Error numbers carried in the `errnum` header field. The values are Linux
//! errno values so that clients in any language can map them with strerror.

pub const EPERM: u32 = 1;
pub const ENOENT: u32 = 2;
pub const EEXIST: u32 = 17;
pub const EAGAIN: u32 = 11;
pub const EINVAL: u32 = 22;
pub const ENOSYS: u32 = 38;
pub const EPROTO: u32 = 71;
pub const EMSGSIZE: u32 = 90;
pub const ECONNREFUSED: u32 = 111;
pub const ETIMEDOUT: u32 = 110;
pub const EHOSTUNREACH: u32 = 113;

/// A short name for an error number, for logs and tool output.
pub fn name(errnum: u32) -> &'static str {
    match errnum {
        0 => "success",
        EPERM => "EPERM",
        ENOENT => "ENOENT",
        EAGAIN => "EAGAIN",
        EINVAL => "EINVAL",
        ENOSYS => "ENOSYS",
        EPROTO => "EPROTO",
        EMSGSIZE => "EMSGSIZE",
        ECONNREFUSED => "ECONNREFUSED",
        ETIMEDOUT => "ETIMEDOUT",
        EHOSTUNREACH => "EHOSTUNREACH",
        _ => "unknown error",
    }
}
