//! The Objective-C runtime, as far as anetrain uses it: classes, selectors, objects with
//! a tagged header and a retain count, autorelease pools, and `objc_msgSend`.
//!
//! Every object is a heap header whose address is the `id` handed out; what the object
//! holds lives in the table of live objects, keyed by that address. A released object's
//! header is kept (never freed, so its address is never reused) and re-tagged dead, so a
//! message to it is reported as a use after release instead of reaching other memory.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CStr, CString};
use std::sync::{LazyLock, Mutex, MutexGuard, RwLock};

use crate::{ane, foundation, log_event};

/// An object pointer, as the caller passes it.
pub type Id = *mut c_void;
/// A selector: a pointer to its interned, NUL-terminated name.
pub type Sel = *const c_void;

/// Header tags: the first word of every object and class.
const TAG_OBJECT: u64 = u64::from_le_bytes(*b"ANEemuOB");
const TAG_CLASS: u64 = u64::from_le_bytes(*b"ANEemuCL");
const TAG_DEAD: u64 = u64::from_le_bytes(*b"ANEemuXX");

/// The classes the emulation implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    NSString,
    NSData,
    NSNumber,
    NSArray,
    NSDictionary,
    NSError,
    Descriptor,
    Model,
    Request,
    SurfaceObject,
    PerfStats,
    /// An `IOSurfaceRef` (a CoreFoundation object, released with `CFRelease`).
    IOSurface,
}

impl Class {
    pub const ALL: [Class; 12] = [
        Class::NSString,
        Class::NSData,
        Class::NSNumber,
        Class::NSArray,
        Class::NSDictionary,
        Class::NSError,
        Class::Descriptor,
        Class::Model,
        Class::Request,
        Class::SurfaceObject,
        Class::PerfStats,
        Class::IOSurface,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::NSString => "NSString",
            Class::NSData => "NSData",
            Class::NSNumber => "NSNumber",
            Class::NSArray => "NSArray",
            Class::NSDictionary => "NSDictionary",
            Class::NSError => "NSError",
            Class::Descriptor => "_ANEInMemoryModelDescriptor",
            Class::Model => "_ANEInMemoryModel",
            Class::Request => "_ANERequest",
            Class::SurfaceObject => "_ANEIOSurfaceObject",
            Class::PerfStats => "_ANEPerformanceStats",
            Class::IOSurface => "IOSurface",
        }
    }

    /// The private ANE classes and IOSurfaces, whose lifetimes the call log records.
    pub fn logged(self) -> bool {
        matches!(self, Class::Model | Class::Request | Class::SurfaceObject | Class::PerfStats | Class::IOSurface)
    }
}

/// The header every object and class starts with.
#[repr(C)]
struct Header {
    tag: u64,
    class: Class,
}

/// What an object holds.
pub enum Body {
    /// Allocated, not yet sent an `init…`.
    Uninit,
    Str(CString),
    Data(Vec<u8>),
    Number(i64),
    Array(Vec<Id>),
    /// Keys and values, in the order given.
    Dict(Vec<(Id, Id)>),
    Error(String),
    Descriptor(ane::Descriptor),
    Model(Box<ane::Model>),
    Request(ane::Request),
    SurfaceObject(Id),
    PerfStats(u64),
    Surface(Box<crate::iosurface::Surface>),
}

impl Body {
    /// The objects this one holds a reference to (released with it).
    fn children(&self) -> Vec<Id> {
        match self {
            Body::Array(items) => items.clone(),
            Body::Dict(entries) => entries.iter().flat_map(|&(k, v)| [k, v]).collect(),
            Body::Model(m) => vec![m.descriptor],
            Body::Request(r) => r.held(),
            Body::SurfaceObject(s) => vec![*s],
            _ => Vec::new(),
        }
    }
}

/// A live object.
pub struct Obj {
    pub class: Class,
    /// Its creation number, for messages and the call log (`_ANERequest#12`).
    pub serial: u64,
    pub retain_count: usize,
    pub body: Body,
}

// SAFETY: the raw pointers in bodies are object addresses used as keys into this same
// table (and surface memory owned by it); the table is only reached through its mutex.
unsafe impl Send for State {}

/// All objects, live and released.
pub struct State {
    pub objects: HashMap<usize, Obj>,
    /// Released objects: class and serial, for use-after-release messages.
    dead: HashMap<usize, (Class, u64)>,
    next_serial: u64,
}

pub(crate) static STATE: LazyLock<Mutex<State>> =
    LazyLock::new(|| Mutex::new(State { objects: HashMap::new(), dead: HashMap::new(), next_serial: 1 }));

/// The object table, locked. Never held across a call back into the caller.
pub fn state() -> MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Stops the process with a message naming what went wrong: what a wrong prototype, a
/// dangling pointer or a broken contract gets. Aborting (not unwinding) is what the real
/// runtime does on such errors, and a test sees the message on the child's stderr.
pub fn fail(message: impl AsRef<str>) -> ! {
    let message = message.as_ref();
    eprintln!("ane-emu: {message}");
    log_event(&format!("abort {message}"));
    std::process::abort()
}

/// One class object per class, never freed.
struct ClassObject(*mut Header);
// SAFETY: class headers are written once at creation and only read afterwards.
unsafe impl Send for ClassObject {}
unsafe impl Sync for ClassObject {}

static CLASSES: LazyLock<Vec<(Class, ClassObject)>> = LazyLock::new(|| {
    Class::ALL
        .iter()
        .map(|&class| (class, ClassObject(Box::into_raw(Box::new(Header { tag: TAG_CLASS, class })))))
        .collect()
});

/// The class object for a name, or null (as `objc_getClass`).
pub fn class_by_name(name: &str) -> Id {
    CLASSES.iter().find(|(c, _)| c.name() == name).map_or(std::ptr::null_mut(), |(_, o)| o.0.cast())
}

/// The class `p` is the class object of, if it is one.
pub fn as_class(p: Id) -> Option<Class> {
    CLASSES.iter().find(|(_, o)| o.0.cast() == p).map(|(c, _)| *c)
}

// --- selectors ------------------------------------------------------------------------

struct Selectors {
    by_name: HashMap<String, usize>,
    by_ptr: HashMap<usize, &'static str>,
}

static SELECTORS: LazyLock<RwLock<Selectors>> =
    LazyLock::new(|| RwLock::new(Selectors { by_name: HashMap::new(), by_ptr: HashMap::new() }));

/// Interns a selector name (`sel_registerName`).
pub fn register_selector(name: &str) -> Sel {
    if let Some(&p) = SELECTORS.read().unwrap_or_else(|e| e.into_inner()).by_name.get(name) {
        return p as Sel;
    }
    let mut sels = SELECTORS.write().unwrap_or_else(|e| e.into_inner());
    if let Some(&p) = sels.by_name.get(name) {
        return p as Sel;
    }
    let leaked: &'static CStr = Box::leak(CString::new(name).expect("names come from C strings").into_boxed_c_str());
    let text: &'static str = leaked.to_str().expect("selector names are checked UTF-8");
    let p = leaked.as_ptr() as usize;
    sels.by_name.insert(name.to_string(), p);
    sels.by_ptr.insert(p, text);
    p as Sel
}

/// The name of a registered selector; aborts on anything else.
pub fn selector_name(sel: Sel, context: &str) -> &'static str {
    match SELECTORS.read().unwrap_or_else(|e| e.into_inner()).by_ptr.get(&(sel as usize)) {
        Some(name) => name,
        None => fail(format!("{context}: {sel:p} is not a selector registered with sel_registerName")),
    }
}

// --- objects --------------------------------------------------------------------------

impl State {
    /// A new object with retain count 1.
    pub fn create(&mut self, class: Class, body: Body) -> Id {
        let p = Box::into_raw(Box::new(Header { tag: TAG_OBJECT, class })).cast::<c_void>();
        let serial = self.next_serial;
        self.next_serial += 1;
        self.objects.insert(p as usize, Obj { class, serial, retain_count: 1, body });
        if class.logged() {
            log_event(&format!("create {}#{serial}", class.name()));
        }
        p
    }

    /// `p` as a live object, or an abort naming the selector and argument at fault.
    pub fn live(&self, p: Id, what: &Arg<'_>) -> &Obj {
        match self.objects.get(&(p as usize)) {
            Some(o) => {
                // SAFETY: every key of `objects` is the address of a header we allocated.
                debug_assert_eq!(unsafe { (*p.cast::<Header>()).tag }, TAG_OBJECT);
                o
            }
            None => fail(self.not_an_object(p, what)),
        }
    }

    pub fn live_mut(&mut self, p: Id, what: &Arg<'_>) -> &mut Obj {
        if !self.objects.contains_key(&(p as usize)) {
            fail(self.not_an_object(p, what));
        }
        self.objects.get_mut(&(p as usize)).expect("checked above")
    }

    /// `p` as a live object of `class`; nil aborts too.
    pub fn expect(&self, p: Id, class: Class, what: &Arg<'_>) -> &Obj {
        if p.is_null() {
            fail(format!("{what}: nil where {} {} is required", article(class), class.name()));
        }
        let o = self.live(p, what);
        if o.class != class {
            fail(format!(
                "{what}: {} {}#{} where {} {} is required",
                article(o.class),
                o.class.name(),
                o.serial,
                article(class),
                class.name()
            ));
        }
        o
    }

    fn not_an_object(&self, p: Id, what: &Arg<'_>) -> String {
        if p.is_null() {
            return format!("{what}: nil where an object is required");
        }
        if let Some((class, serial)) = self.dead.get(&(p as usize)) {
            return format!("{what}: {}#{serial} at {p:p} was already released (use after release)", class.name());
        }
        if as_class(p).is_some() {
            return format!("{what}: {p:p} is a class where an instance is required");
        }
        format!("{what}: {p:p} is not a live object (a wrong objc_msgSend prototype passes garbage)")
    }

    pub fn retain(&mut self, p: Id, what: &Arg<'_>) {
        let o = self.live_mut(p, what);
        o.retain_count += 1;
    }

    /// Drops one reference; at zero the object is deallocated and its children released.
    pub fn release(&mut self, p: Id, what: &Arg<'_>) {
        let o = self.live_mut(p, what);
        if o.class.logged() {
            log_event(&format!("release {}#{}", o.class.name(), o.serial));
        }
        o.retain_count -= 1;
        if o.retain_count > 0 {
            return;
        }
        let mut pending = vec![p];
        while let Some(q) = pending.pop() {
            let o = self.objects.remove(&(q as usize)).expect("only live objects are queued");
            if let Body::Model(m) = &o.body {
                if m.is_loaded() {
                    log_event(&format!("dealloc-while-loaded {}#{}", o.class.name(), o.serial));
                }
            }
            if o.class.logged() {
                log_event(&format!("dealloc {}#{}", o.class.name(), o.serial));
            }
            // SAFETY: `q` is a header we allocated; it is kept, re-tagged, never freed.
            unsafe { (*q.cast::<Header>()).tag = TAG_DEAD };
            self.dead.insert(q as usize, (o.class, o.serial));
            for child in o.body.children() {
                if child.is_null() {
                    continue;
                }
                let c = self.live_mut(child, &Arg::internal("a held object"));
                c.retain_count -= 1;
                if c.retain_count == 0 {
                    pending.push(child);
                }
            }
        }
    }

    /// Live objects, for the leak check: `(class, serial, retain count)`.
    pub fn live_objects(&self) -> Vec<(Class, u64, usize)> {
        let mut v: Vec<_> = self.objects.values().map(|o| (o.class, o.serial, o.retain_count)).collect();
        v.sort_by_key(|&(_, serial, _)| serial);
        v
    }
}

fn article(class: Class) -> &'static str {
    match class.name().as_bytes()[0] {
        b'N' | b'I' => "an",
        _ => "a",
    }
}

/// Which argument of which call a check is about, for messages:
/// "`compileWithQoS:options:error:` argument `options`".
pub struct Arg<'a> {
    pub call: &'a str,
    pub name: &'a str,
}

impl Arg<'_> {
    pub const fn internal(name: &str) -> Arg<'_> {
        Arg { call: "ane-emu", name }
    }
}

impl std::fmt::Display for Arg<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` argument `{}`", self.call, self.name)
    }
}

/// Shorthand: the argument `name` of method `call`.
pub fn arg<'a>(call: &'a str, name: &'a str) -> Arg<'a> {
    Arg { call, name }
}

// --- autorelease pools ----------------------------------------------------------------

thread_local! {
    /// This thread's autoreleased objects, and where each open pool starts.
    static POOLS: RefCell<(Vec<Id>, Vec<usize>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Adds `p` to the innermost pool of this thread; without one, it leaks (as in the real
/// runtime, which logs "autoreleased with no pool in place").
pub fn autorelease(p: Id) -> Id {
    if p.is_null() {
        return p;
    }
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        if pools.1.is_empty() {
            // Not `state()`: callers may hold the table's lock.
            eprintln!("ane-emu: object {p:p} autoreleased with no pool in place - just leaking");
        }
        pools.0.push(p);
    });
    p
}

pub fn pool_push() -> *mut c_void {
    POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        let start = pools.0.len();
        pools.1.push(start);
        // The token: the pool's depth, never null.
        pools.1.len() as *mut c_void
    })
}

pub fn pool_pop(token: *mut c_void) {
    let drained: Vec<Id> = POOLS.with(|pools| {
        let mut pools = pools.borrow_mut();
        let depth = token as usize;
        if depth == 0 || depth != pools.1.len() {
            fail(format!(
                "objc_autoreleasePoolPop: token {token:p} is not the innermost pool of this thread ({} open)",
                pools.1.len()
            ));
        }
        let start = pools.1.pop().expect("checked above");
        pools.0.split_off(start)
    });
    let mut s = state();
    for p in drained {
        s.release(p, &Arg::internal("an object in a draining autorelease pool"));
    }
}

// --- objc_msgSend ---------------------------------------------------------------------

/// What an implementation is: the address of an `extern "C"` function with the method's
/// exact prototype. The trampoline jumps to it with the caller's registers and stack.
pub type Imp = *const ();

/// `(class, sent to the class itself?, selector)` → implementation. `None` as the class:
/// every instance (NSObject's methods).
pub type MethodKey = (Option<Class>, bool, &'static str);

static METHODS: LazyLock<HashMap<MethodKey, usize>> = LazyLock::new(|| {
    let mut m = HashMap::new();
    foundation::register(&mut m);
    ane::register(&mut m);
    m
});

/// Adds a method. `imp` must be an `extern "C"` function with the method's real prototype.
pub fn method(
    m: &mut HashMap<MethodKey, usize>,
    class: Option<Class>,
    class_method: bool,
    sel: &'static str,
    imp: Imp,
) {
    m.insert((class, class_method, sel), imp as usize);
}

/// The receiver's class and whether it is a class object.
fn receiver(recv: Id, sel: &str) -> (Class, bool) {
    if let Some(c) = as_class(recv) {
        return (c, true);
    }
    let s = state();
    let o = s.live(recv, &arg(sel, "self"));
    (o.class, false)
}

fn find(class: Class, class_method: bool, sel: &str) -> Option<usize> {
    METHODS.get(&(Some(class), class_method, sel)).or_else(|| METHODS.get(&(None, class_method, sel))).copied()
}

/// Whether `recv` answers `sel` (`respondsToSelector:`).
pub fn responds(recv: Id, sel: &str) -> bool {
    let (class, class_method) = receiver(recv, sel);
    find(class, class_method, sel).is_some()
}

/// The messenger's lookup: called by the trampoline with the caller's first two
/// arguments, returns where to jump. A message to nil returns 0 (nil, NO), as the real
/// runtime does.
extern "C" fn lookup(recv: Id, sel: Sel) -> usize {
    let name = selector_name(sel, "objc_msgSend");
    if recv.is_null() {
        return nil_imp as *const () as usize;
    }
    let (class, class_method) = receiver(recv, name);
    if let Some(imp) = find(class, class_method, name) {
        return imp;
    }
    let kind = if class_method { "class" } else { "instance of" };
    fail(format!(
        "unknown selector `{name}` sent to {kind} {} (the emulation implements what anetrain sends)",
        class.name()
    ))
}

extern "C" fn nil_imp() -> usize {
    0
}

/// `objc_msgSend`: looks the method up, then tail-jumps to it with every argument
/// register (integer and vector) and the stack exactly as the caller left them, as the
/// real messenger does. So each implementation receives what the caller's prototype put
/// where, and a wrong prototype shows up as a bad argument.
///
/// A naked function rather than `global_asm!`: rustc's export list for a cdylib leaves
/// out symbols defined in `global_asm!`, so `dlsym` would not find them.
///
/// # Safety
/// Called only through a function pointer of the sent method's exact prototype, with a
/// receiver and a registered selector first.
#[cfg(target_arch = "x86_64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn objc_msgSend() {
    core::arch::naked_asm!(
        "push rbp",
        "mov rbp, rsp",
        "push rdi",
        "push rsi",
        "push rdx",
        "push rcx",
        "push r8",
        "push r9",
        // rsp is 16-byte aligned here (8 for the return address + 8 rbp + 48).
        "sub rsp, 128",
        "movdqu [rsp], xmm0",
        "movdqu [rsp + 16], xmm1",
        "movdqu [rsp + 32], xmm2",
        "movdqu [rsp + 48], xmm3",
        "movdqu [rsp + 64], xmm4",
        "movdqu [rsp + 80], xmm5",
        "movdqu [rsp + 96], xmm6",
        "movdqu [rsp + 112], xmm7",
        "call {lookup}",
        "mov r11, rax",
        "movdqu xmm0, [rsp]",
        "movdqu xmm1, [rsp + 16]",
        "movdqu xmm2, [rsp + 32]",
        "movdqu xmm3, [rsp + 48]",
        "movdqu xmm4, [rsp + 64]",
        "movdqu xmm5, [rsp + 80]",
        "movdqu xmm6, [rsp + 96]",
        "movdqu xmm7, [rsp + 112]",
        "add rsp, 128",
        "pop r9",
        "pop r8",
        "pop rcx",
        "pop rdx",
        "pop rsi",
        "pop rdi",
        "pop rbp",
        "jmp r11",
        lookup = sym lookup,
    );
}

/// `objc_msgSend` for arm64: as on x86_64, with x0–x8 and q0–q7 kept; the jump goes
/// through x16, the intra-procedure-call register the real messenger uses too.
///
/// # Safety
/// As the x86_64 one.
#[cfg(target_arch = "aarch64")]
#[unsafe(naked)]
#[no_mangle]
pub unsafe extern "C" fn objc_msgSend() {
    core::arch::naked_asm!(
        "stp x29, x30, [sp, #-16]!",
        "mov x29, sp",
        "stp x0, x1, [sp, #-16]!",
        "stp x2, x3, [sp, #-16]!",
        "stp x4, x5, [sp, #-16]!",
        "stp x6, x7, [sp, #-16]!",
        "stp x8, x9, [sp, #-16]!",
        "stp q0, q1, [sp, #-32]!",
        "stp q2, q3, [sp, #-32]!",
        "stp q4, q5, [sp, #-32]!",
        "stp q6, q7, [sp, #-32]!",
        "bl {lookup}",
        "mov x16, x0",
        "ldp q6, q7, [sp], #32",
        "ldp q4, q5, [sp], #32",
        "ldp q2, q3, [sp], #32",
        "ldp q0, q1, [sp], #32",
        "ldp x8, x9, [sp], #16",
        "ldp x6, x7, [sp], #16",
        "ldp x4, x5, [sp], #16",
        "ldp x2, x3, [sp], #16",
        "ldp x0, x1, [sp], #16",
        "ldp x29, x30, [sp], #16",
        "br x16",
        lookup = sym lookup,
    );
}

/// A C string argument, checked: non-null and UTF-8.
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string.
pub unsafe fn c_str<'a>(p: *const c_char, what: &Arg<'_>) -> &'a str {
    if p.is_null() {
        fail(format!("{what}: a null string"));
    }
    CStr::from_ptr(p).to_str().unwrap_or_else(|_| fail(format!("{what}: not UTF-8")))
}
