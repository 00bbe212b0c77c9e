//! Foundation: NSObject's memory management and introspection, and the value classes
//! anetrain builds (NSString, NSData, NSNumber, NSArray, NSDictionary) or reads (NSError).
//! Each method is an `extern "C"` function with the prototype of the real one.

use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};

use crate::objc::{self, arg, autorelease, fail, method, state, Body, Class, Id, Imp, Sel};

/// `NSUTF8StringEncoding`, the only encoding anetrain uses.
const UTF8_ENCODING: usize = 4;

/// Longer byte counts than this are taken for garbage from a wrong prototype: no MIL
/// text or weight file anetrain sends comes near 16 GiB.
const MAX_PLAUSIBLE_BYTES: usize = 1 << 34;

/// Element counts above this (arrays, dictionaries) are garbage too.
const MAX_PLAUSIBLE_COUNT: usize = 1 << 20;

pub(crate) fn register(m: &mut HashMap<objc::MethodKey, usize>) {
    method(m, None, false, "retain", retain as Imp);
    method(m, None, false, "release", release as Imp);
    method(m, None, false, "respondsToSelector:", responds_to_selector as Imp);
    for class in
        [Class::NSString, Class::NSData, Class::NSNumber, Class::NSArray, Class::NSDictionary, Class::PerfStats]
    {
        method(m, Some(class), true, "alloc", alloc as Imp);
    }
    method(m, Some(Class::NSString), false, "initWithBytes:length:encoding:", string_init as Imp);
    method(m, Some(Class::NSString), false, "UTF8String", utf8_string as Imp);
    method(m, Some(Class::NSString), false, "description", string_description as Imp);
    method(m, Some(Class::NSData), false, "initWithBytes:length:", data_init as Imp);
    method(m, Some(Class::NSNumber), false, "initWithLongLong:", number_init as Imp);
    method(m, Some(Class::NSArray), false, "initWithObjects:count:", array_init as Imp);
    method(m, Some(Class::NSDictionary), false, "initWithObjects:forKeys:count:", dictionary_init as Imp);
    method(m, Some(Class::NSError), false, "description", error_description as Imp);
}

/// `- (instancetype)retain`
extern "C" fn retain(this: Id, _sel: Sel) -> Id {
    state().retain(this, &arg("retain", "self"));
    this
}

/// `- (oneway void)release`
extern "C" fn release(this: Id, _sel: Sel) {
    state().release(this, &arg("release", "self"));
}

/// `- (BOOL)respondsToSelector:(SEL)aSelector`
extern "C" fn responds_to_selector(this: Id, _sel: Sel, asked: Sel) -> i8 {
    let name = objc::selector_name(asked, "`respondsToSelector:` argument `aSelector`");
    objc::responds(this, name) as i8
}

/// `+ (instancetype)alloc`
extern "C" fn alloc(class: Id, _sel: Sel) -> Id {
    let class = objc::as_class(class).expect("the lookup sends +alloc to classes only");
    state().create(class, Body::Uninit)
}

/// Checks that `this` is a fresh `alloc` of `class`, for an `init…` method.
fn check_uninit(this: Id, class: Class, call: &str) {
    let s = state();
    let o = s.expect(this, class, &arg(call, "self"));
    if !matches!(o.body, Body::Uninit) {
        fail(format!("`{call}` sent to {}#{}, which was already initialised", class.name(), o.serial));
    }
}

fn set_body(this: Id, body: Body) -> Id {
    state().live_mut(this, &objc::Arg::internal("init")).body = body;
    this
}

/// Reads `len` bytes at `bytes`, checking the length is plausible.
///
/// # Safety
/// `bytes` must be valid for `len` bytes when the length is plausible.
unsafe fn bytes_arg<'a>(bytes: *const c_void, len: usize, call: &str) -> &'a [u8] {
    if len > MAX_PLAUSIBLE_BYTES {
        fail(format!("{}: {len} bytes is not a plausible length", arg(call, "length")));
    }
    if len == 0 {
        return &[];
    }
    if bytes.is_null() {
        fail(format!("{}: null with a length of {len}", arg(call, "bytes")));
    }
    std::slice::from_raw_parts(bytes.cast::<u8>(), len)
}

/// `- (instancetype)initWithBytes:(const void *)bytes length:(NSUInteger)len encoding:(NSStringEncoding)enc`
extern "C" fn string_init(this: Id, _sel: Sel, bytes: *const c_void, len: usize, encoding: usize) -> Id {
    const CALL: &str = "initWithBytes:length:encoding:";
    check_uninit(this, Class::NSString, CALL);
    if encoding != UTF8_ENCODING {
        fail(format!("{}: {encoding} is not NSUTF8StringEncoding (4)", arg(CALL, "encoding")));
    }
    // SAFETY: the caller passes `len` readable bytes.
    let bytes = unsafe { bytes_arg(bytes, len, CALL) };
    match std::str::from_utf8(bytes).ok().and_then(|s| CString::new(s).ok()) {
        Some(s) => set_body(this, Body::Str(s)),
        None => {
            // As Foundation: an init that fails releases the receiver and returns nil.
            state().release(this, &arg(CALL, "self"));
            std::ptr::null_mut()
        }
    }
}

/// `- (const char *)UTF8String`
extern "C" fn utf8_string(this: Id, _sel: Sel) -> *const c_char {
    let s = state();
    match &s.expect(this, Class::NSString, &arg("UTF8String", "self")).body {
        // The pointer lives as long as the string object, as Foundation's inner pointer.
        Body::Str(c) => c.as_ptr(),
        _ => fail("`UTF8String` sent to an uninitialised NSString"),
    }
}

/// `- (NSString *)description` of a string: itself.
extern "C" fn string_description(this: Id, _sel: Sel) -> Id {
    this
}

/// `- (instancetype)initWithBytes:(const void *)bytes length:(NSUInteger)length`
extern "C" fn data_init(this: Id, _sel: Sel, bytes: *const c_void, len: usize) -> Id {
    const CALL: &str = "initWithBytes:length:";
    check_uninit(this, Class::NSData, CALL);
    // SAFETY: the caller passes `len` readable bytes.
    let bytes = unsafe { bytes_arg(bytes, len, CALL) }.to_vec();
    set_body(this, Body::Data(bytes))
}

/// `- (NSNumber *)initWithLongLong:(long long)value`
extern "C" fn number_init(this: Id, _sel: Sel, value: i64) -> Id {
    check_uninit(this, Class::NSNumber, "initWithLongLong:");
    set_body(this, Body::Number(value))
}

/// Reads and checks `count` object pointers, each a live object.
///
/// # Safety
/// `items` must be valid for `count` pointers when the count is plausible.
unsafe fn objects_arg(items: *const Id, count: usize, call: &str, name: &str) -> Vec<Id> {
    if count > MAX_PLAUSIBLE_COUNT {
        fail(format!("{}: {count} is not a plausible count", arg(call, "count")));
    }
    if count == 0 {
        return Vec::new();
    }
    if items.is_null() {
        fail(format!("{}: null with a count of {count}", arg(call, name)));
    }
    let items = std::slice::from_raw_parts(items, count).to_vec();
    let s = state();
    for (i, &p) in items.iter().enumerate() {
        let what = format!("{name}[{i}]");
        s.live(p, &arg(call, &what));
    }
    items
}

/// `- (instancetype)initWithObjects:(const id [])objects count:(NSUInteger)cnt`
extern "C" fn array_init(this: Id, _sel: Sel, objects: *const Id, count: usize) -> Id {
    const CALL: &str = "initWithObjects:count:";
    check_uninit(this, Class::NSArray, CALL);
    // SAFETY: the caller passes `count` object pointers.
    let items = unsafe { objects_arg(objects, count, CALL, "objects") };
    let mut s = state();
    for &p in &items {
        s.retain(p, &arg(CALL, "objects"));
    }
    drop(s);
    set_body(this, Body::Array(items))
}

/// `- (instancetype)initWithObjects:(const id [])objects forKeys:(const id<NSCopying> [])keys count:(NSUInteger)cnt`
extern "C" fn dictionary_init(this: Id, _sel: Sel, objects: *const Id, keys: *const Id, count: usize) -> Id {
    const CALL: &str = "initWithObjects:forKeys:count:";
    check_uninit(this, Class::NSDictionary, CALL);
    // SAFETY: the caller passes `count` keys and `count` objects.
    let (values, keys) =
        unsafe { (objects_arg(objects, count, CALL, "objects"), objects_arg(keys, count, CALL, "keys")) };
    let mut s = state();
    for (i, (&k, &v)) in keys.iter().zip(&values).enumerate() {
        s.expect(k, Class::NSString, &arg(CALL, &format!("keys[{i}]")));
        // Keys are copied (an immutable string's copy is itself, retained); values retained.
        s.retain(k, &arg(CALL, "keys"));
        s.retain(v, &arg(CALL, "objects"));
    }
    drop(s);
    set_body(this, Body::Dict(keys.into_iter().zip(values).collect()))
}

/// `- (NSString *)description` of an error: the framework's "Error Domain=… Code=… "…"" form.
extern "C" fn error_description(this: Id, _sel: Sel) -> Id {
    let text = match &state().expect(this, Class::NSError, &arg("description", "self")).body {
        Body::Error(text) => text.clone(),
        _ => unreachable!("NSErrors are made with their text"),
    };
    new_string(&text)
}

/// A new autoreleased NSString.
pub fn new_string(text: &str) -> Id {
    let c = CString::new(text.replace('\0', " ")).expect("NULs replaced");
    autorelease(state().create(Class::NSString, Body::Str(c)))
}

/// A new autoreleased NSError with the framework's description format.
pub fn new_error(code: i64, text: &str) -> Id {
    let description = format!(
        "Error Domain=com.apple.appleneuralengine Code={code} \"{text}\" UserInfo={{NSLocalizedDescription={text}}}"
    );
    autorelease(state().create(Class::NSError, Body::Error(description)))
}

/// The string value of an NSString object (checked).
pub fn string_value(s: &objc::State, p: Id, what: &objc::Arg<'_>) -> String {
    match &s.expect(p, Class::NSString, what).body {
        Body::Str(c) => c.to_string_lossy().into_owned(),
        _ => fail(format!("{what}: an uninitialised NSString")),
    }
}

/// The entries of an NSDictionary (checked).
pub fn dict_entries(s: &objc::State, p: Id, what: &objc::Arg<'_>) -> Vec<(Id, Id)> {
    match &s.expect(p, Class::NSDictionary, what).body {
        Body::Dict(entries) => entries.clone(),
        _ => fail(format!("{what}: an uninitialised NSDictionary")),
    }
}

/// The value under string key `key` in an NSDictionary.
pub fn dict_get(s: &objc::State, p: Id, key: &str, what: &objc::Arg<'_>) -> Option<Id> {
    dict_entries(s, p, what).into_iter().find(|&(k, _)| string_value(s, k, what) == key).map(|(_, v)| v)
}

/// An NSNumber's value (checked).
pub fn number_value(s: &objc::State, p: Id, what: &objc::Arg<'_>) -> i64 {
    match &s.expect(p, Class::NSNumber, what).body {
        Body::Number(n) => *n,
        _ => fail(format!("{what}: an uninitialised NSNumber")),
    }
}

/// An NSArray's items (checked).
pub fn array_items(s: &objc::State, p: Id, what: &objc::Arg<'_>) -> Vec<Id> {
    match &s.expect(p, Class::NSArray, what).body {
        Body::Array(items) => items.clone(),
        _ => fail(format!("{what}: an uninitialised NSArray")),
    }
}

/// An NSData's bytes (checked).
pub fn data_bytes(s: &objc::State, p: Id, what: &objc::Arg<'_>) -> Vec<u8> {
    match &s.expect(p, Class::NSData, what).body {
        Body::Data(b) => b.clone(),
        _ => fail(format!("{what}: an uninitialised NSData")),
    }
}
