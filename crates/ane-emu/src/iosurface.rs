//! IOSurfaces: flat buffers with lock, unlock and a base address, created from a
//! properties dictionary and released with `CFRelease`.
//!
//! A surface locked read-only must not be written: its bytes are hashed at lock and
//! checked at unlock, and a change aborts. A surface bound to a request must be unlocked
//! while the ANE runs (`evaluate` checks).

use std::ffi::c_void;

use crate::foundation::{dict_get, number_value};
use crate::objc::{arg, fail, state, Arg, Body, Class, Id};

/// `kIOSurfaceLockReadOnly`.
pub const LOCK_READ_ONLY: u32 = 1;
/// `kIOSurfaceLockAvoidSync`, the other documented lock option.
const LOCK_AVOID_SYNC: u32 = 2;
/// `kIOReturnNotPermitted`, `kIOReturnBadArgument`: IOKit status codes.
const RETURN_NOT_PERMITTED: i32 = 0xe00002e2_u32 as i32;
const RETURN_BAD_ARGUMENT: i32 = 0xe00002c2_u32 as i32;

/// An IOSurface's memory and lock state.
pub struct Surface {
    /// The allocation; never reallocated, so the base address is stable.
    pub memory: Box<[u8]>,
    pub width: usize,
    pub height: usize,
    pub bytes_per_element: usize,
    pub bytes_per_row: usize,
    pub lock: Option<Lock>,
}

/// How a surface is locked.
pub struct Lock {
    pub read_only: bool,
    /// Nested locks of the same kind.
    pub depth: usize,
    /// Hash of the bytes at a read-only lock.
    pub hash: u64,
}

fn hash(bytes: &[u8]) -> u64 {
    // FNV-1a: a change detector, not a cryptographic hash; a crate would add nothing.
    bytes.iter().fold(0xcbf29ce484222325_u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100000001b3))
}

fn with_surface<R>(p: Id, call: &str, f: impl FnOnce(&mut Surface, u64) -> R) -> R {
    let mut s = state();
    let what = arg(call, "buffer");
    if p.is_null() {
        fail(format!("{what}: a null IOSurfaceRef"));
    }
    let o = s.live_mut(p, &what);
    let serial = o.serial;
    match &mut o.body {
        Body::Surface(surface) => f(surface, serial),
        _ => fail(format!("{what}: {}#{serial} is not an IOSurface", o.class.name())),
    }
}

/// `IOSurfaceRef IOSurfaceCreate(CFDictionaryRef properties)`
#[no_mangle]
pub extern "C" fn IOSurfaceCreate(properties: Id) -> Id {
    const CALL: &str = "IOSurfaceCreate";
    let mut s = state();
    let what = arg(CALL, "properties");
    let get = |key: &str| -> usize {
        let v = dict_get(&s, properties, key, &what)
            .unwrap_or_else(|| fail(format!("{what}: no `{key}` (anetrain always gives all six)")));
        let n = number_value(&s, v, &Arg { call: CALL, name: key });
        usize::try_from(n).unwrap_or_else(|_| fail(format!("{what}: `{key}` is {n}")))
    };
    let width = get("IOSurfaceWidth");
    let height = get("IOSurfaceHeight");
    let bytes_per_element = get("IOSurfaceBytesPerElement");
    let bytes_per_row = get("IOSurfaceBytesPerRow");
    let alloc = get("IOSurfaceAllocSize");
    let _pixel_format = get("IOSurfacePixelFormat");
    if width == 0 || height == 0 || bytes_per_element == 0 {
        return std::ptr::null_mut();
    }
    if bytes_per_row < width * bytes_per_element || alloc < bytes_per_row * height {
        // The real IOSurfaceCreate returns NULL for inconsistent geometry.
        return std::ptr::null_mut();
    }
    let surface = Surface {
        memory: vec![0u8; alloc].into_boxed_slice(),
        width,
        height,
        bytes_per_element,
        bytes_per_row,
        lock: None,
    };
    s.create(Class::IOSurface, Body::Surface(Box::new(surface)))
}

/// `kern_return_t IOSurfaceLock(IOSurfaceRef buffer, IOSurfaceLockOptions options, uint32_t *seed)`
#[no_mangle]
pub extern "C" fn IOSurfaceLock(buffer: Id, options: u32, _seed: *mut u32) -> i32 {
    if options & !(LOCK_READ_ONLY | LOCK_AVOID_SYNC) != 0 {
        return RETURN_BAD_ARGUMENT;
    }
    let read_only = options & LOCK_READ_ONLY != 0;
    with_surface(buffer, "IOSurfaceLock", |surface, _| match &mut surface.lock {
        Some(lock) if lock.read_only == read_only => {
            lock.depth += 1;
            0
        }
        Some(_) => RETURN_NOT_PERMITTED,
        None => {
            let hash = if read_only { hash(&surface.memory) } else { 0 };
            surface.lock = Some(Lock { read_only, depth: 1, hash });
            0
        }
    })
}

/// `kern_return_t IOSurfaceUnlock(IOSurfaceRef buffer, IOSurfaceLockOptions options, uint32_t *seed)`
#[no_mangle]
pub extern "C" fn IOSurfaceUnlock(buffer: Id, options: u32, _seed: *mut u32) -> i32 {
    let read_only = options & LOCK_READ_ONLY != 0;
    with_surface(buffer, "IOSurfaceUnlock", |surface, serial| {
        let Some(lock) = &mut surface.lock else {
            fail(format!("IOSurfaceUnlock: IOSurface#{serial} is not locked"));
        };
        if lock.read_only != read_only {
            fail(format!(
                "IOSurfaceUnlock: IOSurface#{serial} was locked {} and is unlocked {}",
                if lock.read_only { "read-only" } else { "read-write" },
                if read_only { "read-only" } else { "read-write" }
            ));
        }
        if lock.read_only && hash(&surface.memory) != lock.hash {
            fail(format!("IOSurface#{serial} was written while locked read-only"));
        }
        lock.depth -= 1;
        if lock.depth == 0 {
            surface.lock = None;
        }
        0
    })
}

/// `void *IOSurfaceGetBaseAddress(IOSurfaceRef buffer)`
#[no_mangle]
pub extern "C" fn IOSurfaceGetBaseAddress(buffer: Id) -> *mut c_void {
    with_surface(buffer, "IOSurfaceGetBaseAddress", |surface, _| surface.memory.as_mut_ptr().cast())
}

/// `size_t IOSurfaceGetBytesPerRow(IOSurfaceRef buffer)`
#[no_mangle]
pub extern "C" fn IOSurfaceGetBytesPerRow(buffer: Id) -> usize {
    with_surface(buffer, "IOSurfaceGetBytesPerRow", |surface, _| surface.bytes_per_row)
}

/// `size_t IOSurfaceGetHeight(IOSurfaceRef buffer)`
#[no_mangle]
pub extern "C" fn IOSurfaceGetHeight(buffer: Id) -> usize {
    with_surface(buffer, "IOSurfaceGetHeight", |surface, _| surface.height)
}

/// `size_t IOSurfaceGetWidth(IOSurfaceRef buffer)`
#[no_mangle]
pub extern "C" fn IOSurfaceGetWidth(buffer: Id) -> usize {
    with_surface(buffer, "IOSurfaceGetWidth", |surface, _| surface.width)
}

/// `size_t IOSurfaceGetBytesPerElement(IOSurfaceRef buffer)`
#[no_mangle]
pub extern "C" fn IOSurfaceGetBytesPerElement(buffer: Id) -> usize {
    with_surface(buffer, "IOSurfaceGetBytesPerElement", |surface, _| surface.bytes_per_element)
}

/// `size_t IOSurfaceGetAllocSize(IOSurfaceRef buffer)`
#[no_mangle]
pub extern "C" fn IOSurfaceGetAllocSize(buffer: Id) -> usize {
    with_surface(buffer, "IOSurfaceGetAllocSize", |surface, _| surface.memory.len())
}
