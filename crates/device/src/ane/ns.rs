//! The Foundation values the ANE framework is called with, modelled as a plain Rust
//! enum. Everything the device hands to Objective-C is built here first, as an
//! [`NsValue`], and converted to real `NSString`/`NSData`/`NSNumber`/`NSDictionary`/
//! `NSArray` objects only at the FFI edge ([`super::runtime`]). So the structure of every
//! argument — the weights dictionary, the IOSurface properties — is tested on any OS.

use std::borrow::Cow;

use mil::blob::Weights;

/// A Foundation value, before it becomes an Objective-C object.
#[derive(Clone, Debug, PartialEq)]
pub enum NsValue<'a> {
    /// `NSString`.
    Str(Cow<'a, str>),
    /// `NSData` (the bytes are copied into the object at the FFI edge).
    Data(&'a [u8]),
    /// `NSNumber` holding a 64-bit integer.
    Int(i64),
    /// `NSDictionary` with string keys, in this order (order matters only to tests).
    Dict(Vec<(Cow<'a, str>, NsValue<'a>)>),
    /// `NSArray`.
    Array(Vec<NsValue<'a>>),
}

impl<'a> NsValue<'a> {
    pub fn str(s: impl Into<Cow<'a, str>>) -> NsValue<'a> {
        NsValue::Str(s.into())
    }

    /// A dictionary from `(key, value)` pairs.
    pub fn dict(entries: impl IntoIterator<Item = (&'a str, NsValue<'a>)>) -> NsValue<'a> {
        NsValue::Dict(entries.into_iter().map(|(k, v)| (Cow::Borrowed(k), v)).collect())
    }

    /// The value under `key`, if this is a dictionary holding it.
    pub fn get(&self, key: &str) -> Option<&NsValue<'a>> {
        match self {
            NsValue::Dict(entries) => entries.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            NsValue::Int(v) => Some(*v),
            _ => None,
        }
    }
}

/// The key under which a weight file is given to the compiler: exactly the path the MIL
/// text's `BLOBFILE(path = …)` uses, `@model_path/weights/NAME.bin`.
///
/// `modelWithMILText:weights:optionsPlist:` takes
/// `{ "@model_path/weights/NAME.bin": { "offset": 0, "data": <NSData> } }`. The real
/// offset of each tensor lives in the MIL text; the dictionary's `offset` is 0 in every
/// public use. A weight-free program gets an empty dictionary: nil reportedly crashes
/// (Orion paper, constraint #11).
pub fn weights_dictionary(weights: &Weights) -> NsValue<'_> {
    NsValue::Dict(
        weights
            .files()
            .map(|(path, bytes)| {
                (Cow::Borrowed(path), NsValue::dict([("offset", NsValue::Int(0)), ("data", NsValue::Data(bytes))]))
            })
            .collect(),
    )
}

/// The MIL text as the compiler takes it: UTF-8 bytes in an `NSData`. An `NSString`
/// reportedly crashes (Orion paper, constraint #9).
pub fn mil_text(text: &str) -> NsValue<'_> {
    NsValue::Data(text.as_bytes())
}

/// `IOSurfaceCreate`'s properties for a flat buffer of `alloc_bytes` bytes: one row of
/// one-byte elements, row and allocation both exactly `alloc_bytes`. This is the shape
/// every public ANE user allocates; the ANE reads the buffer as packed `[1, C, 1, S]`
/// data from byte 0 whatever the surface's nominal geometry.
pub fn surface_properties(alloc_bytes: usize) -> NsValue<'static> {
    let n = alloc_bytes as i64;
    NsValue::dict([
        ("IOSurfaceWidth", NsValue::Int(n)),
        ("IOSurfaceHeight", NsValue::Int(1)),
        ("IOSurfaceBytesPerElement", NsValue::Int(1)),
        ("IOSurfaceBytesPerRow", NsValue::Int(n)),
        ("IOSurfaceAllocSize", NsValue::Int(n)),
        ("IOSurfacePixelFormat", NsValue::Int(0)),
    ])
}

/// `@[@0, @1, …, @(n-1)]`: the `inputIndices:`/`outputIndices:` of a request.
pub fn indices(n: usize) -> NsValue<'static> {
    NsValue::Array((0..n as i64).map(NsValue::Int).collect())
}

/// `@{}`: the options of compile, load, evaluate and unload.
pub fn no_options() -> NsValue<'static> {
    NsValue::Dict(Vec::new())
}
