//! The Objective-C edge: the frameworks loaded at run time, `objc_msgSend` called through
//! exact function-pointer prototypes, Foundation values made from [`NsValue`]s, IOSurfaces,
//! and ownership ([`ObjcId`] releases what it owns).
//!
//! Nothing here is linked at build time: the frameworks are `dlopen`ed, so this module
//! compiles (and is linted) on every OS, and on one without them [`Runtime::load`]
//! returns an error naming what is missing.
//!
//! Why one prototype per call shape: on arm64, `objc_msgSend` is not variadic from the
//! caller's side; arguments go where the callee's real signature expects them (an
//! integer in a general register, a `double` in a float register, the ninth argument on
//! the stack). Calling it as a variadic function puts them elsewhere. So every send
//! below transmutes the one `objc_msgSend` address to the exact `extern "C"` signature
//! of the method called.

use std::ffi::{c_char, c_void, CStr, CString};
use std::mem::transmute;
use std::ptr::{self, NonNull};
use std::sync::OnceLock;

use libloading::Library;

use super::binding::RowLayout;
use super::ns::NsValue;

/// An Objective-C object pointer.
pub type Id = *mut c_void;
/// A selector.
pub type Sel = *const c_void;

pub const ANE_FRAMEWORK: &str = "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine";
pub const FOUNDATION: &str = "/System/Library/Frameworks/Foundation.framework/Foundation";
pub const CORE_FOUNDATION: &str = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation";
pub const IOSURFACE: &str = "/System/Library/Frameworks/IOSurface.framework/IOSurface";
/// The Objective-C runtime's real image (`libobjc.dylib` is a symlink to it; the seed's
/// reference links this one).
pub const LIBOBJC: &str = "/usr/lib/libobjc.A.dylib";

/// The environment variable naming other images to load instead of the system's: one
/// path (used for all five images, as the emulation `crates/ane-emu` is one library), or
/// five paths separated by `:` in [`Runtime::load`]'s order. Read only when set.
pub const FRAMEWORKS_ENV: &str = "ANETRAIN_ANE_FRAMEWORKS";

/// `NSUTF8StringEncoding`.
const UTF8_ENCODING: usize = 4;
/// `kIOSurfaceLockReadOnly`.
const LOCK_READ_ONLY: u32 = 1;

/// The private classes the call sequence uses; all must exist.
const REQUIRED_CLASSES: [&str; 4] =
    ["_ANEInMemoryModelDescriptor", "_ANEInMemoryModel", "_ANERequest", "_ANEIOSurfaceObject"];

/// Function pointers resolved from the loaded images.
struct Fns {
    /// `objc_msgSend`, only ever called after a transmute to the method's real prototype.
    msg_send: unsafe extern "C" fn(),
    get_class: unsafe extern "C" fn(*const c_char) -> Id,
    sel_register_name: unsafe extern "C" fn(*const c_char) -> Sel,
    pool_push: unsafe extern "C" fn() -> *mut c_void,
    pool_pop: unsafe extern "C" fn(*mut c_void),
    cf_release: unsafe extern "C" fn(*const c_void),
    temporary_directory: unsafe extern "C" fn() -> Id,
    surface_create: unsafe extern "C" fn(Id) -> Id,
    surface_lock: unsafe extern "C" fn(Id, u32, *mut u32) -> i32,
    surface_unlock: unsafe extern "C" fn(Id, u32, *mut u32) -> i32,
    surface_base_address: unsafe extern "C" fn(Id) -> *mut c_void,
    surface_bytes_per_row: unsafe extern "C" fn(Id) -> usize,
    surface_height: unsafe extern "C" fn(Id) -> usize,
    surface_width: unsafe extern "C" fn(Id) -> usize,
    surface_bytes_per_element: unsafe extern "C" fn(Id) -> usize,
    surface_alloc_size: unsafe extern "C" fn(Id) -> usize,
}

/// The loaded frameworks. Loaded once per process and never unloaded (system images in
/// the shared cache cannot be), so objects may refer to it as `&'static`.
pub struct Runtime {
    fns: Fns,
    _libraries: Vec<Library>,
}

// SAFETY: `Runtime` holds function pointers into loaded system images and the `Library`
// handles keeping them loaded; none of it is mutated after `load`, and the Objective-C
// runtime functions it points to are thread-safe.
unsafe impl Send for Runtime {}
unsafe impl Sync for Runtime {}

impl Runtime {
    /// The process's runtime, loading the frameworks on first use.
    pub fn get() -> Result<&'static Runtime, String> {
        static RUNTIME: OnceLock<Result<Runtime, String>> = OnceLock::new();
        RUNTIME
            .get_or_init(|| match std::env::var_os(FRAMEWORKS_ENV) {
                None => Runtime::load(&[LIBOBJC, FOUNDATION, CORE_FOUNDATION, IOSURFACE, ANE_FRAMEWORK]),
                Some(value) => {
                    let paths = framework_paths(&value.to_string_lossy())?;
                    Runtime::load(&paths.each_ref().map(String::as_str))
                }
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Loads the images at `paths` (libobjc, Foundation, CoreFoundation, IOSurface,
    /// AppleNeuralEngine, in that order) and resolves what the device calls. The error
    /// names the image or symbol missing.
    pub fn load(paths: &[&str; 5]) -> Result<Runtime, String> {
        let mut libraries = Vec::new();
        for path in paths {
            // SAFETY: loading a system framework runs its initialisers, which is what
            // every program linking it does.
            let lib = unsafe { Library::new(path) }.map_err(|e| format!("cannot load {path}: {e}"))?;
            libraries.push(lib);
        }
        let [objc, foundation, core_foundation, iosurface, _ane] = &libraries[..] else {
            unreachable!("five images were asked for")
        };
        // SAFETY (every `sym` call): each symbol is looked up with the C prototype it has
        // in Apple's public headers (objc/runtime.h, objc/message.h, Foundation,
        // CoreFoundation, IOSurface/IOSurfaceRef.h).
        unsafe {
            let fns = Fns {
                msg_send: sym(objc, "objc_msgSend")?,
                get_class: sym(objc, "objc_getClass")?,
                sel_register_name: sym(objc, "sel_registerName")?,
                pool_push: sym(objc, "objc_autoreleasePoolPush")?,
                pool_pop: sym(objc, "objc_autoreleasePoolPop")?,
                cf_release: sym(core_foundation, "CFRelease")?,
                temporary_directory: sym(foundation, "NSTemporaryDirectory")?,
                surface_create: sym(iosurface, "IOSurfaceCreate")?,
                surface_lock: sym(iosurface, "IOSurfaceLock")?,
                surface_unlock: sym(iosurface, "IOSurfaceUnlock")?,
                surface_base_address: sym(iosurface, "IOSurfaceGetBaseAddress")?,
                surface_bytes_per_row: sym(iosurface, "IOSurfaceGetBytesPerRow")?,
                surface_height: sym(iosurface, "IOSurfaceGetHeight")?,
                surface_width: sym(iosurface, "IOSurfaceGetWidth")?,
                surface_bytes_per_element: sym(iosurface, "IOSurfaceGetBytesPerElement")?,
                surface_alloc_size: sym(iosurface, "IOSurfaceGetAllocSize")?,
            };
            let rt = Runtime { fns, _libraries: libraries };
            for class in REQUIRED_CLASSES {
                if rt.class(class).is_null() {
                    return Err(format!(
                        "AppleNeuralEngine.framework has no class {class} (this macOS version changed the private API)"
                    ));
                }
            }
            Ok(rt)
        }
    }

    /// A class by name, or null.
    pub fn class(&self, name: &str) -> Id {
        let c = CString::new(name).expect("class names have no NUL");
        // SAFETY: objc_getClass takes a NUL-terminated name and returns the class or nil.
        unsafe { (self.fns.get_class)(c.as_ptr()) }
    }

    /// A selector by name.
    pub fn sel(&self, name: &str) -> Sel {
        let c = CString::new(name).expect("selector names have no NUL");
        // SAFETY: sel_registerName takes a NUL-terminated name and never fails.
        unsafe { (self.fns.sel_register_name)(c.as_ptr()) }
    }

    /// An autorelease pool for the current scope: framework methods return autoreleased
    /// objects, and a Rust thread has no pool of its own.
    pub fn pool(&'static self) -> Pool {
        // SAFETY: push/pop are balanced by `Pool`'s drop, on the same thread (`Pool` is !Send).
        Pool { rt: self, token: unsafe { (self.fns.pool_push)() } }
    }

    /// The raw `objc_msgSend` address, for a caller that needs a prototype not below (the
    /// emulation's tests call it with a wrong one on purpose).
    ///
    /// # Safety
    /// Transmute it only to the exact prototype of the method sent.
    pub unsafe fn msg_send_raw(&self) -> unsafe extern "C" fn() {
        self.fns.msg_send
    }

    // --- objc_msgSend, one exact prototype per call shape -----------------------------

    /// `[recv sel]` returning an object.
    ///
    /// # Safety
    /// `recv` must be a live object (or nil) that responds to `sel` with this signature.
    pub unsafe fn send_id(&self, recv: Id, sel: &str) -> Id {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel) -> Id>(self.fns.msg_send);
        f(recv, self.sel(sel))
    }

    /// `[recv sel]` returning nothing.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_void(&self, recv: Id, sel: &str) {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel)>(self.fns.msg_send);
        f(recv, self.sel(sel))
    }

    /// `[recv sel]` returning an `unsigned long long`.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_u64(&self, recv: Id, sel: &str) -> u64 {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel) -> u64>(self.fns.msg_send);
        f(recv, self.sel(sel))
    }

    /// `[recv sel:a]` with an object argument.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id); `a` must be what the method takes.
    pub unsafe fn send_id1(&self, recv: Id, sel: &str, a: Id) -> Id {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Id) -> Id>(self.fns.msg_send);
        f(recv, self.sel(sel), a)
    }

    /// `[recv sel:a]` with an `unsigned int` argument, returning nothing (`setPerfStatsMask:`).
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_void_u32(&self, recv: Id, sel: &str, a: u32) {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, u32)>(self.fns.msg_send);
        f(recv, self.sel(sel), a)
    }

    /// `[recv respondsToSelector:@selector(name)]`; false for nil.
    ///
    /// # Safety
    /// `recv` must be a live object or nil.
    pub unsafe fn responds_to(&self, recv: Id, name: &str) -> bool {
        if recv.is_null() {
            return false;
        }
        // Every NSObject responds to respondsToSelector: with this signature.
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Sel) -> i8>(self.fns.msg_send);
        f(recv, self.sel("respondsToSelector:"), self.sel(name)) != 0
    }

    /// `+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:]` and other
    /// three-object class factories.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_id3(&self, recv: Id, sel: &str, a: Id, b: Id, c: Id) -> Id {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Id, Id, Id) -> Id>(self.fns.msg_send);
        f(recv, self.sel(sel), a, b, c)
    }

    /// `compileWithQoS:options:error:` and `loadWithQoS:options:error:`:
    /// `(unsigned int qos, NSDictionary *options, NSError **error) -> BOOL`.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_qos_options_error(&self, recv: Id, sel: &str, qos: u32, options: Id, error: *mut Id) -> bool {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, u32, Id, *mut Id) -> i8>(
            self.fns.msg_send,
        );
        f(recv, self.sel(sel), qos, options, error) != 0
    }

    /// `evaluateWithQoS:options:request:error:`:
    /// `(unsigned int qos, NSDictionary *options, _ANERequest *request, NSError **error) -> BOOL`.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_evaluate(&self, recv: Id, qos: u32, options: Id, request: Id, error: *mut Id) -> bool {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, u32, Id, Id, *mut Id) -> i8>(
            self.fns.msg_send,
        );
        f(recv, self.sel("evaluateWithQoS:options:request:error:"), qos, options, request, error) != 0
    }

    /// `unloadWithQoS:error:`: `(unsigned int qos, NSError **error) -> BOOL`.
    ///
    /// # Safety
    /// As [`send_id`](Self::send_id).
    pub unsafe fn send_unload(&self, recv: Id, qos: u32, error: *mut Id) -> bool {
        let f =
            transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, u32, *mut Id) -> i8>(self.fns.msg_send);
        f(recv, self.sel("unloadWithQoS:error:"), qos, error) != 0
    }

    /// `+[_ANEIOSurfaceObject objectWithIOSurface:]`: `(IOSurfaceRef) -> id`.
    ///
    /// # Safety
    /// `surface` must be a live IOSurfaceRef.
    pub unsafe fn surface_object(&self, surface: Id) -> Id {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Id) -> Id>(self.fns.msg_send);
        f(self.class("_ANEIOSurfaceObject"), self.sel("objectWithIOSurface:"), surface)
    }

    /// `+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:]`:
    /// seven object arguments (the seventh is the ninth parameter, passed on the stack on arm64).
    ///
    /// # Safety
    /// Every argument must be an object of the kind the method takes, or nil.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn request(
        &self,
        inputs: Id,
        input_indices: Id,
        outputs: Id,
        output_indices: Id,
        weights_buffer: Id,
        perf_stats: Id,
        procedure_index: Id,
    ) -> Id {
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Id, Id, Id, Id, Id, Id, Id) -> Id>(
            self.fns.msg_send,
        );
        f(
            self.class("_ANERequest"),
            self.sel("requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:"),
            inputs,
            input_indices,
            outputs,
            output_indices,
            weights_buffer,
            perf_stats,
            procedure_index,
        )
    }

    // --- Foundation values ------------------------------------------------------------

    /// `[cls alloc]`: an uninitialised instance, to be sent an `init…` message.
    fn alloc(&self, class: &str) -> Id {
        // SAFETY: every NSObject class responds to +alloc.
        unsafe { self.send_id(self.class(class), "alloc") }
    }

    /// Makes the Objective-C object an [`NsValue`] describes (+1 retained).
    pub fn make(&'static self, v: &NsValue<'_>) -> Result<ObjcId, String> {
        // SAFETY (all arms): each init method is sent with its documented prototype to a
        // freshly allocated instance of its class; the pointers passed stay valid for the
        // call, and the inits copy what they are given.
        let made = unsafe {
            match v {
                NsValue::Str(s) => {
                    let f = transmute::<
                        unsafe extern "C" fn(),
                        unsafe extern "C" fn(Id, Sel, *const c_void, usize, usize) -> Id,
                    >(self.fns.msg_send);
                    f(
                        self.alloc("NSString"),
                        self.sel("initWithBytes:length:encoding:"),
                        s.as_ptr().cast(),
                        s.len(),
                        UTF8_ENCODING,
                    )
                }
                NsValue::Data(bytes) => {
                    let f = transmute::<
                        unsafe extern "C" fn(),
                        unsafe extern "C" fn(Id, Sel, *const c_void, usize) -> Id,
                    >(self.fns.msg_send);
                    f(self.alloc("NSData"), self.sel("initWithBytes:length:"), bytes.as_ptr().cast(), bytes.len())
                }
                NsValue::Int(n) => {
                    let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, i64) -> Id>(
                        self.fns.msg_send,
                    );
                    f(self.alloc("NSNumber"), self.sel("initWithLongLong:"), *n)
                }
                NsValue::Dict(entries) => {
                    let keys: Vec<ObjcId> =
                        entries.iter().map(|(k, _)| self.make(&NsValue::Str(k.clone()))).collect::<Result<_, _>>()?;
                    let values: Vec<ObjcId> = entries.iter().map(|(_, v)| self.make(v)).collect::<Result<_, _>>()?;
                    let key_ptrs: Vec<Id> = keys.iter().map(ObjcId::as_ptr).collect();
                    let value_ptrs: Vec<Id> = values.iter().map(ObjcId::as_ptr).collect();
                    let f = transmute::<
                        unsafe extern "C" fn(),
                        unsafe extern "C" fn(Id, Sel, *const Id, *const Id, usize) -> Id,
                    >(self.fns.msg_send);
                    // The dictionary retains keys (copies) and values; ours are released after.
                    f(
                        self.alloc("NSDictionary"),
                        self.sel("initWithObjects:forKeys:count:"),
                        value_ptrs.as_ptr(),
                        key_ptrs.as_ptr(),
                        entries.len(),
                    )
                }
                NsValue::Array(items) => {
                    let objects: Vec<ObjcId> = items.iter().map(|v| self.make(v)).collect::<Result<_, _>>()?;
                    self.array(&objects.iter().map(ObjcId::as_ptr).collect::<Vec<_>>()).into_raw()
                }
            }
        };
        ObjcId::owned(self, made).ok_or_else(|| format!("Foundation could not make {}", kind(v)))
    }

    /// An `NSArray` of existing objects (+1 retained; the array retains its items).
    pub fn array(&'static self, items: &[Id]) -> ObjcId {
        // SAFETY: initWithObjects:count: reads `count` object pointers and retains them.
        let made = unsafe {
            let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, *const Id, usize) -> Id>(
                self.fns.msg_send,
            );
            f(self.alloc("NSArray"), self.sel("initWithObjects:count:"), items.as_ptr(), items.len())
        };
        ObjcId::owned(self, made).expect("NSArray init does not fail")
    }

    /// The `description` of an object (an `NSError`, say) as a Rust string.
    ///
    /// # Safety
    /// `obj` must be a live object or nil; call inside an autorelease pool.
    pub unsafe fn description(&self, obj: Id) -> Option<String> {
        if obj.is_null() {
            return None;
        }
        self.string(self.send_id(obj, "description"))
    }

    /// An `NSString`'s UTF-8 contents.
    ///
    /// # Safety
    /// `s` must be a live NSString or nil; call inside an autorelease pool.
    pub unsafe fn string(&self, s: Id) -> Option<String> {
        if s.is_null() {
            return None;
        }
        let f = transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel) -> *const c_char>(self.fns.msg_send);
        let p = f(s, self.sel("UTF8String"));
        (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
    }

    /// `NSTemporaryDirectory()`: the per-user temporary directory the ANE compiler reads
    /// model directories from.
    pub fn temporary_directory(&'static self) -> Option<String> {
        let _pool = self.pool();
        // SAFETY: NSTemporaryDirectory takes nothing and returns an autoreleased NSString.
        unsafe { self.string((self.fns.temporary_directory)()) }
    }

    // --- IOSurfaces -------------------------------------------------------------------

    /// A flat IOSurface of `alloc_bytes` bytes (see [`super::ns::surface_properties`]).
    pub fn create_surface(&'static self, alloc_bytes: usize) -> Result<IoSurface, String> {
        let _pool = self.pool();
        let props = self.make(&super::ns::surface_properties(alloc_bytes))?;
        // SAFETY: an NSDictionary is toll-free bridged to the CFDictionaryRef IOSurfaceCreate takes.
        let s = unsafe { (self.fns.surface_create)(props.as_ptr()) };
        NonNull::new(s)
            .map(|ptr| IoSurface { rt: self, ptr })
            .ok_or_else(|| format!("IOSurfaceCreate refused a {alloc_bytes}-byte surface"))
    }

    fn cf_release(&self, p: Id) {
        // SAFETY: only called by owners of a +1 CF reference, once.
        unsafe { (self.fns.cf_release)(p) }
    }
}

/// The five image paths [`FRAMEWORKS_ENV`] names: one path for all, or five separated by `:`.
pub fn framework_paths(value: &str) -> Result<[String; 5], String> {
    let parts: Vec<&str> = value.split(':').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{FRAMEWORKS_ENV}=`{value}`: an empty path; give one library path, or five separated by `:`"
        ));
    }
    match parts[..] {
        [one] => Ok([one; 5].map(String::from)),
        [objc, foundation, core_foundation, iosurface, ane] => {
            Ok([objc, foundation, core_foundation, iosurface, ane].map(String::from))
        }
        _ => Err(format!(
            "{FRAMEWORKS_ENV}=`{value}` names {} paths; give one library path (for all images), or five separated \
             by `:` (libobjc, Foundation, CoreFoundation, IOSurface, AppleNeuralEngine)",
            parts.len()
        )),
    }
}

/// What kind of value an [`NsValue`] is, for errors.
fn kind(v: &NsValue<'_>) -> &'static str {
    match v {
        NsValue::Str(_) => "an NSString",
        NsValue::Data(_) => "an NSData",
        NsValue::Int(_) => "an NSNumber",
        NsValue::Dict(_) => "an NSDictionary",
        NsValue::Array(_) => "an NSArray",
    }
}

/// Looks up a symbol as a function of type `T`.
///
/// # Safety
/// `T` must be the symbol's real C prototype.
unsafe fn sym<T: Copy>(lib: &Library, name: &str) -> Result<T, String> {
    let mut bytes = name.as_bytes().to_vec();
    bytes.push(0);
    lib.get::<T>(&bytes).map(|s| *s).map_err(|e| format!("missing symbol {name}: {e}"))
}

/// An owned (+1) reference to an Objective-C object, released on drop.
#[derive(Debug)]
pub struct ObjcId {
    rt: &'static Runtime,
    ptr: NonNull<c_void>,
}

// SAFETY: retain/release are atomic in the Objective-C runtime; the objects anetrain
// holds (Foundation values, ANE models, requests) are used by one thread at a time, the
// holder's (`Kernel::eval` takes `&mut self`).
unsafe impl Send for ObjcId {}
unsafe impl Sync for ObjcId {}

impl ObjcId {
    /// Takes ownership of a +1 reference (from `alloc`/`init`, `new`, `copy`); None for nil.
    pub fn owned(rt: &'static Runtime, p: Id) -> Option<ObjcId> {
        NonNull::new(p).map(|ptr| ObjcId { rt, ptr })
    }

    /// Retains an autoreleased object (what class factories return) and owns that reference.
    pub fn retained(rt: &'static Runtime, p: Id) -> Option<ObjcId> {
        // SAFETY: `p` is a live object: autoreleased objects live until their pool drains.
        NonNull::new(p)
            .map(|ptr| ObjcId { rt, ptr: unsafe { NonNull::new_unchecked(rt.send_id(ptr.as_ptr(), "retain")) } })
    }

    pub fn as_ptr(&self) -> Id {
        self.ptr.as_ptr()
    }

    /// Gives up ownership without releasing.
    pub fn into_raw(self) -> Id {
        let p = self.ptr.as_ptr();
        std::mem::forget(self);
        p
    }
}

impl Drop for ObjcId {
    fn drop(&mut self) {
        // SAFETY: we own one reference to a live object.
        unsafe { self.rt.send_void(self.ptr.as_ptr(), "release") }
    }
}

/// An autorelease pool, drained on drop. Not `Send`: a pool belongs to its thread.
pub struct Pool {
    rt: &'static Runtime,
    token: *mut c_void,
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: `token` came from objc_autoreleasePoolPush on this thread.
        unsafe { (self.rt.fns.pool_pop)(self.token) }
    }
}

/// An owned IOSurface, released (CFRelease) on drop.
#[derive(Debug)]
pub struct IoSurface {
    rt: &'static Runtime,
    ptr: NonNull<c_void>,
}

// SAFETY: IOSurfaces are kernel objects shared across processes; the handle may move
// between threads, and all access to its memory goes through lock/unlock.
unsafe impl Send for IoSurface {}
unsafe impl Sync for IoSurface {}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Runtime")
    }
}

impl IoSurface {
    pub fn as_ptr(&self) -> Id {
        self.ptr.as_ptr()
    }

    /// Locks the surface for writing and hands `f` its memory and row layout.
    pub fn with_write<R>(&self, f: impl FnOnce(&mut [u8], RowLayout) -> R) -> Result<R, String> {
        // SAFETY: between lock and unlock the base address is valid for the allocation
        // size, and nothing else touches the memory: eval is synchronous, so the ANE is
        // not running while a kernel copies, and the kernel is borrowed mutably.
        unsafe {
            let (base, len, layout) = self.lock(0)?;
            let r = f(std::slice::from_raw_parts_mut(base, len), layout);
            self.unlock(0);
            Ok(r)
        }
    }

    /// Locks the surface read-only and hands `f` its memory and row layout.
    pub fn with_read<R>(&self, f: impl FnOnce(&[u8], RowLayout) -> R) -> Result<R, String> {
        // SAFETY: as in `with_write`, read-only.
        unsafe {
            let (base, len, layout) = self.lock(LOCK_READ_ONLY)?;
            let r = f(std::slice::from_raw_parts(base, len), layout);
            self.unlock(LOCK_READ_ONLY);
            Ok(r)
        }
    }

    /// `IOSurfaceLock`, then where the memory is and how its rows lie.
    ///
    /// # Safety
    /// Must be paired with `unlock(options)`.
    unsafe fn lock(&self, options: u32) -> Result<(*mut u8, usize, RowLayout), String> {
        let fns = &self.rt.fns;
        let s = self.as_ptr();
        let status = (fns.surface_lock)(s, options, ptr::null_mut());
        if status != 0 {
            return Err(format!("IOSurfaceLock failed with status {status:#x}"));
        }
        let layout = RowLayout {
            row_bytes: (fns.surface_width)(s) * (fns.surface_bytes_per_element)(s),
            bytes_per_row: (fns.surface_bytes_per_row)(s),
            rows: (fns.surface_height)(s),
        };
        Ok(((fns.surface_base_address)(s).cast::<u8>(), (fns.surface_alloc_size)(s), layout))
    }

    unsafe fn unlock(&self, options: u32) {
        (self.rt.fns.surface_unlock)(self.as_ptr(), options, ptr::null_mut());
    }
}

impl Drop for IoSurface {
    fn drop(&mut self) {
        self.rt.cf_release(self.ptr.as_ptr());
    }
}
