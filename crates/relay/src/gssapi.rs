//! Kerberos through the system's MIT GSS-API library (libgssapi_krb5.so.2), loaded when integrated
//! authentication is first used, so Panel runs (and every other mode works) on hosts without it.
//! Only the handful of calls SASL GSSAPI (RFC 4752) needs: acquire credentials (the default
//! credential cache, or a keytab), establish a context with `smtp@relay`, wrap and unwrap.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr::{null, null_mut};
use std::sync::OnceLock;

type OM = u32;

#[repr(C)]
struct Buffer {
    length: usize,
    value: *mut c_void,
}

impl Buffer {
    fn empty() -> Buffer {
        Buffer { length: 0, value: null_mut() }
    }

    fn from(data: &[u8]) -> Buffer {
        Buffer { length: data.len(), value: data.as_ptr() as *mut c_void }
    }
}

#[repr(C)]
struct KeyValue {
    key: *const c_char,
    value: *const c_char,
}

#[repr(C)]
struct KeyValueSet {
    count: OM,
    elements: *const KeyValue,
}

type Oid = *const c_void;

type ImportName = unsafe extern "C" fn(*mut OM, *const Buffer, Oid, *mut *mut c_void) -> OM;
type AcquireCredFrom = unsafe extern "C" fn(
    *mut OM,
    *mut c_void,
    OM,
    *const c_void,
    c_int,
    *const KeyValueSet,
    *mut *mut c_void,
    *mut *mut c_void,
    *mut OM,
) -> OM;
type InitSecContext = unsafe extern "C" fn(
    *mut OM,
    *mut c_void,
    *mut *mut c_void,
    *mut c_void,
    Oid,
    OM,
    OM,
    *const c_void,
    *const Buffer,
    *mut Oid,
    *mut Buffer,
    *mut OM,
    *mut OM,
) -> OM;
type Wrap = unsafe extern "C" fn(*mut OM, *mut c_void, c_int, OM, *const Buffer, *mut c_int, *mut Buffer) -> OM;
type Unwrap = unsafe extern "C" fn(*mut OM, *mut c_void, *const Buffer, *mut Buffer, *mut c_int, *mut OM) -> OM;
type ReleaseBuffer = unsafe extern "C" fn(*mut OM, *mut Buffer) -> OM;
type ReleaseHandle = unsafe extern "C" fn(*mut OM, *mut *mut c_void) -> OM;
type DeleteContext = unsafe extern "C" fn(*mut OM, *mut *mut c_void, *mut Buffer) -> OM;
type DisplayStatus = unsafe extern "C" fn(*mut OM, OM, c_int, Oid, *mut OM, *mut Buffer) -> OM;

struct Lib {
    import_name: ImportName,
    acquire_cred_from: AcquireCredFrom,
    init_sec_context: InitSecContext,
    wrap: Wrap,
    unwrap: Unwrap,
    release_buffer: ReleaseBuffer,
    release_name: ReleaseHandle,
    release_cred: ReleaseHandle,
    delete_sec_context: DeleteContext,
    display_status: DisplayStatus,
    nt_hostbased_service: Oid,
    nt_principal_name: Oid,
    mech_krb5: Oid,
}

// The library's functions and OID constants are immutable and thread-safe.
unsafe impl Send for Lib {}
unsafe impl Sync for Lib {}

const LIBRARY: &CStr = c"libgssapi_krb5.so.2";
const COMPLETE: OM = 0;
const CONTINUE_NEEDED: OM = 1;
const INITIATE: c_int = 1;
const MUTUAL: OM = 2;
const SEQUENCE: OM = 8;
const INTEG: OM = 32;

fn lib() -> Result<&'static Lib, String> {
    static LIB: OnceLock<Result<Lib, String>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Lib, String> {
    // SAFETY: dlopen/dlsym with NUL-terminated names; each symbol is cast to the type the MIT
    // GSS-API headers declare for it.
    unsafe {
        let handle = libc::dlopen(LIBRARY.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if handle.is_null() {
            return Err(
                "integrated authentication needs the MIT Kerberos GSS-API library (libgssapi_krb5.so.2); install libgssapi-krb5-2"
                    .into(),
            );
        }
        let sym = |name: &CStr| -> Result<*mut c_void, String> {
            let p = libc::dlsym(handle, name.as_ptr());
            if p.is_null() { Err(format!("libgssapi_krb5 lacks {}", name.to_string_lossy())) } else { Ok(p) }
        };
        // OID symbols are variables holding a gss_OID.
        let oid = |name: &CStr| -> Result<Oid, String> { Ok(*(sym(name)? as *const Oid)) };
        Ok(Lib {
            import_name: std::mem::transmute::<*mut c_void, ImportName>(sym(c"gss_import_name")?),
            acquire_cred_from: std::mem::transmute::<*mut c_void, AcquireCredFrom>(sym(c"gss_acquire_cred_from")?),
            init_sec_context: std::mem::transmute::<*mut c_void, InitSecContext>(sym(c"gss_init_sec_context")?),
            wrap: std::mem::transmute::<*mut c_void, Wrap>(sym(c"gss_wrap")?),
            unwrap: std::mem::transmute::<*mut c_void, Unwrap>(sym(c"gss_unwrap")?),
            release_buffer: std::mem::transmute::<*mut c_void, ReleaseBuffer>(sym(c"gss_release_buffer")?),
            release_name: std::mem::transmute::<*mut c_void, ReleaseHandle>(sym(c"gss_release_name")?),
            release_cred: std::mem::transmute::<*mut c_void, ReleaseHandle>(sym(c"gss_release_cred")?),
            delete_sec_context: std::mem::transmute::<*mut c_void, DeleteContext>(sym(c"gss_delete_sec_context")?),
            display_status: std::mem::transmute::<*mut c_void, DisplayStatus>(sym(c"gss_display_status")?),
            nt_hostbased_service: oid(c"GSS_C_NT_HOSTBASED_SERVICE")?,
            nt_principal_name: oid(c"GSS_KRB5_NT_PRINCIPAL_NAME")?,
            mech_krb5: oid(c"gss_mech_krb5")?,
        })
    }
}

/// A GSS-API failure in words: the library's major and minor (Kerberos) messages.
#[derive(Debug, Clone)]
pub struct GssError(pub String);

fn status_text(lib: &Lib, code: OM, kind: c_int) -> String {
    let mut parts = Vec::new();
    let mut ctx: OM = 0;
    loop {
        let (mut minor, mut buf) = (0, Buffer::empty());
        // SAFETY: the library fills `buf`, which we read and release.
        unsafe {
            (lib.display_status)(&mut minor, code, kind, lib.mech_krb5, &mut ctx, &mut buf);
            if !buf.value.is_null() {
                let s = std::slice::from_raw_parts(buf.value as *const u8, buf.length);
                parts.push(String::from_utf8_lossy(s).trim().to_string());
                (lib.release_buffer)(&mut minor, &mut buf);
            }
        }
        if ctx == 0 || parts.len() > 8 {
            break;
        }
    }
    parts.retain(|p| !p.is_empty() && p != "Unspecified GSS failure.  Minor code may provide more information");
    parts.join("; ")
}

fn check(lib: &Lib, major: OM, minor: OM, what: &str) -> Result<OM, GssError> {
    if major & 0xffff_0000 == 0 {
        return Ok(major);
    }
    let mut text = status_text(lib, major, 1);
    let minor_text = status_text(lib, minor, 2);
    if !minor_text.is_empty() {
        text = if text.is_empty() { minor_text } else { format!("{minor_text} ({text})") };
    }
    Err(GssError(format!("{what}: {text}")))
}

/// One security context with the relay. Owns its GSS-API handles.
pub struct Context {
    lib: &'static Lib,
    cred: *mut c_void,
    target: *mut c_void,
    ctx: *mut c_void,
    complete: bool,
}

// The handles are used by one task at a time (moved between blocking calls, never shared).
unsafe impl Send for Context {}

impl Context {
    /// Credentials from `keytab` for `principal` (a private in-memory ticket cache), or else the
    /// process's default credential cache; the target is the relay's service principal, e.g.
    /// `smtp/relay.example.org` (or `smtp@relay.example.org`).
    pub fn new(keytab: Option<&Path>, principal: Option<&str>, service: &str) -> Result<Context, GssError> {
        let lib = lib().map_err(GssError)?;
        let mut c = Context { lib, cred: null_mut(), target: null_mut(), ctx: null_mut(), complete: false };
        let (name, host_based) = match service.split_once('/') {
            Some((svc, host)) if !host.contains('@') => (format!("{svc}@{host}"), true),
            _ if service.contains('/') => (service.to_string(), false),
            _ => (service.to_string(), true),
        };
        c.target = import(lib, &name, if host_based { lib.nt_hostbased_service } else { lib.nt_principal_name })?;
        if let Some(keytab) = keytab {
            let client = match principal {
                Some(p) => import(lib, p, lib.nt_principal_name)?,
                None => null_mut(),
            };
            let kt =
                CString::new(keytab.display().to_string()).map_err(|_| GssError("keytab path has a NUL".into()))?;
            let cache = CString::new(format!("MEMORY:panel-{}", std::process::id())).expect("no NUL");
            let elements = [
                KeyValue { key: c"client_keytab".as_ptr(), value: kt.as_ptr() },
                KeyValue { key: c"ccache".as_ptr(), value: cache.as_ptr() },
            ];
            let store = KeyValueSet { count: 2, elements: elements.as_ptr() };
            let mut minor = 0;
            // SAFETY: all pointers are valid for the call; the library returns an owned cred.
            let major = unsafe {
                (lib.acquire_cred_from)(
                    &mut minor,
                    client,
                    0,
                    null(),
                    INITIATE,
                    &store,
                    &mut c.cred,
                    null_mut(),
                    null_mut(),
                )
            };
            if !client.is_null() {
                let mut n = client;
                // SAFETY: releasing the name we imported.
                unsafe { (lib.release_name)(&mut minor, &mut n) };
            }
            check(lib, major, minor, &format!("credentials from keytab {}", keytab.display()))?;
        }
        Ok(c)
    }

    /// Feeds the relay's token (empty at first); returns the token to send.
    pub fn step(&mut self, input: &[u8]) -> Result<Vec<u8>, GssError> {
        let (mut minor, mut out) = (0, Buffer::empty());
        let input_buf = Buffer::from(input);
        // SAFETY: handles are ours; `out` is released after copying.
        let major = unsafe {
            (self.lib.init_sec_context)(
                &mut minor,
                self.cred,
                &mut self.ctx,
                self.target,
                self.lib.mech_krb5,
                MUTUAL | SEQUENCE | INTEG,
                0,
                null(),
                if input.is_empty() { null() } else { &input_buf },
                null_mut(),
                &mut out,
                null_mut(),
                null_mut(),
            )
        };
        let token = self.take(&mut out);
        let major = check(self.lib, major, minor, "Kerberos context with the relay")?;
        self.complete = major == COMPLETE;
        debug_assert!(major == COMPLETE || major == CONTINUE_NEEDED);
        Ok(token)
    }

    pub fn is_complete(&self) -> bool {
        self.complete
    }

    pub fn unwrap(&self, data: &[u8]) -> Result<Vec<u8>, GssError> {
        let (mut minor, mut out, mut conf, mut qop) = (0, Buffer::empty(), 0, 0);
        // SAFETY: as above.
        let major =
            unsafe { (self.lib.unwrap)(&mut minor, self.ctx, &Buffer::from(data), &mut out, &mut conf, &mut qop) };
        let plain = self.take(&mut out);
        check(self.lib, major, minor, "unwrapping the relay's security layer offer")?;
        Ok(plain)
    }

    pub fn wrap(&self, data: &[u8]) -> Result<Vec<u8>, GssError> {
        let (mut minor, mut out, mut conf) = (0, Buffer::empty(), 0);
        // SAFETY: as above.
        let major = unsafe { (self.lib.wrap)(&mut minor, self.ctx, 0, 0, &Buffer::from(data), &mut conf, &mut out) };
        let wrapped = self.take(&mut out);
        check(self.lib, major, minor, "wrapping the security layer choice")?;
        Ok(wrapped)
    }

    fn take(&self, buf: &mut Buffer) -> Vec<u8> {
        if buf.value.is_null() {
            return Vec::new();
        }
        let mut minor = 0;
        // SAFETY: the library allocated `buf`; copy, then release it.
        unsafe {
            let v = std::slice::from_raw_parts(buf.value as *const u8, buf.length).to_vec();
            (self.lib.release_buffer)(&mut minor, buf);
            v
        }
    }
}

fn import(lib: &Lib, name: &str, kind: Oid) -> Result<*mut c_void, GssError> {
    let (mut minor, mut out) = (0, null_mut());
    // SAFETY: the buffer points into `name` for the duration of the call.
    let major = unsafe { (lib.import_name)(&mut minor, &Buffer::from(name.as_bytes()), kind, &mut out) };
    check(lib, major, minor, &format!("the name {name}"))?;
    Ok(out)
}

impl Drop for Context {
    fn drop(&mut self) {
        let mut minor = 0;
        // SAFETY: each handle is ours and released once.
        unsafe {
            if !self.ctx.is_null() {
                (self.lib.delete_sec_context)(&mut minor, &mut self.ctx, null_mut());
            }
            if !self.cred.is_null() {
                (self.lib.release_cred)(&mut minor, &mut self.cred);
            }
            if !self.target.is_null() {
                (self.lib.release_name)(&mut minor, &mut self.target);
            }
        }
    }
}
