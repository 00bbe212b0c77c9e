//! The private AppleNeuralEngine classes: `_ANEInMemoryModelDescriptor`,
//! `_ANEInMemoryModel` (compile, load, evaluate, unload), `_ANEIOSurfaceObject`,
//! `_ANERequest` and `_ANEPerformanceStats`.
//!
//! Compile reads the model directory the caller wrote under `NSTemporaryDirectory()`
//! (`<hexStringIdentifier>/model.mil` and the weight files), parses and lints it with the
//! `mil` crate and rejects what the real compiler is reported to reject
//! ([`crate::Rule`]). Evaluate runs the program on the CPU device in fp16-rounding mode,
//! reading and writing the request's surfaces by the binding rule in force.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use device::cpu::CpuDevice;
use device::{Device, Kernel, Precision, Surface};
use mil::blob::{Weights, MODEL_PATH};
use mil::lint::{self, Severity};
use mil::{DType, Program, Var};
use sha2::{Digest, Sha256};

use crate::foundation::{array_items, data_bytes, dict_entries, dict_get, new_error, new_string, number_value};
use crate::objc::{self, arg, autorelease, fail, method, state, Arg, Body, Class, Id, Imp, Sel};
use crate::{config, log_event, Rule};

/// QoS values the framework takes: the seed's `test_qos_sweep` found "all QoS values
/// 0-63 compile, load, and eval successfully" (`training/m5result.md`). Anything larger
/// is taken for garbage from a wrong prototype.
const MAX_QOS: u32 = 63;

/// The smallest surface reported to evaluate (Orion constraint #4: "~49 KB"; status 0x1d
/// otherwise). The same figure the lint uses.
const MIN_SURFACE_BYTES: usize = mil::lint::MIN_SURFACE_BYTES;

/// Spatial widths (last axis) reported to need a multiple of this (Orion: "pad the seq
/// dim to >= 16").
const WIDTH_MULTIPLE: usize = 16;

/// The status the seed and Orion report for multi-input requests, small and unequal
/// surfaces: "multi-input ANE requests cause 0x1d error" (the seed's README).
const STATUS_0X1D: &str = "ANEProgramProcessRequestDirect() Failed with status=0x1d";

/// The compiler's reported failure text (the seed's and Orion's logs).
const COMPILE_FAILED: &str = "_ANECompiler : ANECCompile() FAILED";

/// What a descriptor holds: the MIL text and the weights dictionary's contents.
pub struct Descriptor {
    pub mil: Vec<u8>,
    pub hex: String,
}

/// An in-memory model and where it is in compile → load → evaluate → unload.
pub struct Model {
    pub descriptor: Id,
    hex: String,
    compiled: Option<Arc<Compiled>>,
    loaded: bool,
    perf_stats_mask: u32,
}

impl Model {
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }
}

/// A compiled program: the CPU kernel that stands in for the ANE's, and the binding order.
pub struct Compiled {
    name: String,
    inputs: Vec<Var>,
    outputs: Vec<Var>,
    /// `input_order[k]`: the declared input bound at request index `k`.
    input_order: Vec<usize>,
    output_order: Vec<usize>,
    kernel: Mutex<Box<dyn Kernel>>,
}

/// What a request holds (each retained, nil where not given).
pub struct Request {
    inputs: Id,
    input_indices: Id,
    outputs: Id,
    output_indices: Id,
    weights_buffer: Id,
    perf_stats: Id,
    procedure_index: Id,
}

impl Request {
    pub fn held(&self) -> Vec<Id> {
        [
            self.inputs,
            self.input_indices,
            self.outputs,
            self.output_indices,
            self.weights_buffer,
            self.perf_stats,
            self.procedure_index,
        ]
        .into_iter()
        .filter(|p| !p.is_null())
        .collect()
    }
}

pub(crate) fn register(m: &mut HashMap<objc::MethodKey, usize>) {
    method(m, Some(Class::Descriptor), true, "modelWithMILText:weights:optionsPlist:", descriptor_new as Imp);
    method(m, Some(Class::Model), true, "inMemoryModelWithDescriptor:", model_new as Imp);
    method(m, Some(Class::Model), false, "hexStringIdentifier", model_hex as Imp);
    method(m, Some(Class::Model), false, "setPerfStatsMask:", model_set_perf_stats_mask as Imp);
    method(m, Some(Class::Model), false, "compileWithQoS:options:error:", model_compile as Imp);
    method(m, Some(Class::Model), false, "loadWithQoS:options:error:", model_load as Imp);
    method(m, Some(Class::Model), false, "evaluateWithQoS:options:request:error:", model_evaluate as Imp);
    method(m, Some(Class::Model), false, "unloadWithQoS:error:", model_unload as Imp);
    method(m, Some(Class::SurfaceObject), true, "objectWithIOSurface:", surface_object_new as Imp);
    method(
        m,
        Some(Class::Request),
        true,
        "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",
        request_new as Imp,
    );
    method(m, Some(Class::Request), false, "perfStats", request_perf_stats as Imp);
    method(m, Some(Class::PerfStats), false, "init", perf_stats_init as Imp);
    method(m, Some(Class::PerfStats), false, "hwExecutionTime", perf_stats_hw_time as Imp);
}

// --- checks shared by the methods -------------------------------------------------------

fn check_qos(qos: u32, call: &str) {
    if qos > MAX_QOS {
        fail(format!("{}: {qos} is not a QoS value (0..={MAX_QOS})", arg(call, "qos")));
    }
}

/// An `NSError **` out-parameter: null, or an aligned pointer that is not an object.
fn check_error_out(error: *mut Id, call: &str) {
    if error.is_null() {
        return;
    }
    let what = arg(call, "error");
    if !(error as usize).is_multiple_of(std::mem::align_of::<Id>()) {
        fail(format!("{what}: {error:p} is not an aligned NSError ** (a wrong prototype passes garbage)"));
    }
    let s = state();
    if s.objects.contains_key(&(error as usize)) || objc::as_class(error.cast()).is_some() {
        fail(format!("{what}: {error:p} is an object, not an NSError ** (a wrong prototype shifts arguments)"));
    }
}

/// Options: nil or an NSDictionary.
fn check_options(options: Id, call: &str) {
    if !options.is_null() {
        dict_entries(&state(), options, &arg(call, "options"));
    }
}

/// Stores an autoreleased NSError in `*error` (if given) and returns NO.
fn failed(error: *mut Id, model: &str, code: i64, text: &str) -> i8 {
    log_event(&format!("error {model}: {text}"));
    let e = new_error(code, text);
    if !error.is_null() {
        // SAFETY: checked as an aligned out-pointer by `check_error_out`.
        unsafe { *error = e };
    }
    0
}

fn model_label(this: Id) -> String {
    let s = state();
    let o = s.live(this, &Arg::internal("model"));
    format!("{}#{}", o.class.name(), o.serial)
}

fn with_model<R>(this: Id, call: &str, f: impl FnOnce(&mut Model) -> R) -> R {
    let mut s = state();
    let what = arg(call, "self");
    s.expect(this, Class::Model, &what);
    match &mut s.live_mut(this, &what).body {
        Body::Model(m) => f(m),
        _ => unreachable!("models are made with their body"),
    }
}

// --- _ANEInMemoryModelDescriptor and _ANEInMemoryModel ---------------------------------

/// `+ (instancetype)modelWithMILText:(NSData *)text weights:(NSDictionary *)weights optionsPlist:(NSDictionary *)options`
extern "C" fn descriptor_new(_class: Id, _sel: Sel, text: Id, weights: Id, options: Id) -> Id {
    const CALL: &str = "modelWithMILText:weights:optionsPlist:";
    let mut s = state();
    let text_arg = arg(CALL, "text");
    if !text.is_null() && s.live(text, &text_arg).class == Class::NSString {
        fail(format!(
            "{text_arg}: an NSString; the MIL text must be NSData (an NSString reportedly crashes, Orion #9)"
        ));
    }
    let mil = data_bytes(&s, text, &text_arg);
    let weights_arg = arg(CALL, "weights");
    if weights.is_null() {
        fail(format!("{weights_arg}: nil; give an empty dictionary (nil reportedly crashes, Orion #11)"));
    }
    let mut hasher = Sha256::new();
    hasher.update(&mil);
    for (key, value) in dict_entries(&s, weights, &weights_arg) {
        let path = crate::foundation::string_value(&s, key, &weights_arg);
        if !path.starts_with(MODEL_PATH) {
            fail(format!("{weights_arg}: key `{path}` does not start with `{MODEL_PATH}`"));
        }
        let entry = arg(CALL, "weights[…]");
        let offset = dict_get(&s, value, "offset", &entry)
            .unwrap_or_else(|| fail(format!("{weights_arg}: `{path}` has no `offset`")));
        number_value(&s, offset, &entry);
        let data = dict_get(&s, value, "data", &entry)
            .unwrap_or_else(|| fail(format!("{weights_arg}: `{path}` has no `data`")));
        hasher.update(path.as_bytes());
        hasher.update(data_bytes(&s, data, &entry));
    }
    if !options.is_null() {
        dict_entries(&s, options, &arg(CALL, "optionsPlist"));
    }
    let hex: String = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
    autorelease(s.create(Class::Descriptor, Body::Descriptor(Descriptor { mil, hex })))
}

/// `+ (instancetype)inMemoryModelWithDescriptor:(_ANEInMemoryModelDescriptor *)descriptor`
extern "C" fn model_new(_class: Id, _sel: Sel, descriptor: Id) -> Id {
    const CALL: &str = "inMemoryModelWithDescriptor:";
    let mut s = state();
    let what = arg(CALL, "descriptor");
    let hex = match &s.expect(descriptor, Class::Descriptor, &what).body {
        Body::Descriptor(d) => d.hex.clone(),
        _ => unreachable!("descriptors are made with their body"),
    };
    s.retain(descriptor, &what);
    let model = Model { descriptor, hex, compiled: None, loaded: false, perf_stats_mask: 0 };
    autorelease(s.create(Class::Model, Body::Model(Box::new(model))))
}

/// `- (NSString *)hexStringIdentifier`
extern "C" fn model_hex(this: Id, _sel: Sel) -> Id {
    let hex = with_model(this, "hexStringIdentifier", |m| m.hex.clone());
    new_string(&hex)
}

/// `- (void)setPerfStatsMask:(unsigned int)mask`
extern "C" fn model_set_perf_stats_mask(this: Id, _sel: Sel, mask: u32) {
    with_model(this, "setPerfStatsMask:", |m| m.perf_stats_mask = mask);
}

/// `- (BOOL)compileWithQoS:(unsigned int)qos options:(NSDictionary *)options error:(NSError **)error`
extern "C" fn model_compile(this: Id, _sel: Sel, qos: u32, options: Id, error: *mut Id) -> i8 {
    const CALL: &str = "compileWithQoS:options:error:";
    with_model(this, CALL, |_| ());
    check_qos(qos, CALL);
    check_options(options, CALL);
    check_error_out(error, CALL);
    let label = model_label(this);
    log_event(&format!("send {CALL} {label}"));
    let (hex, mil) = {
        let s = state();
        let Body::Model(m) = &s.live(this, &Arg::internal("model")).body else { unreachable!() };
        let Body::Descriptor(d) = &s.live(m.descriptor, &Arg::internal("descriptor")).body else { unreachable!() };
        (m.hex.clone(), d.mil.clone())
    };
    let n = crate::count_compile();
    let cfg = config();
    if cfg.rejects(Rule::Budget) && n > cfg.compile_limit {
        return failed(
            error,
            &label,
            -1,
            &format!("{COMPILE_FAILED} (compile {n} of this process; the emulated budget is {})", cfg.compile_limit),
        );
    }
    let dir = crate::temporary_directory().join(&hex);
    match compile(&dir, &mil) {
        Ok(compiled) => {
            with_model(this, CALL, |m| m.compiled = Some(Arc::new(compiled)));
            1
        }
        Err(text) => failed(error, &label, -1, &text),
    }
}

/// Reads and checks the model directory, then compiles the program for the CPU device.
fn compile(dir: &Path, descriptor_mil: &[u8]) -> Result<Compiled, String> {
    let mil_path = dir.join("model.mil");
    let text =
        std::fs::read(&mil_path).map_err(|e| format!("{COMPILE_FAILED}: cannot read {}: {e}", mil_path.display()))?;
    if text != descriptor_mil {
        return Err(format!("{COMPILE_FAILED}: {} is not the descriptor's MIL text", mil_path.display()));
    }
    let text =
        String::from_utf8(text).map_err(|_| format!("InvalidMILProgram: {} is not UTF-8", mil_path.display()))?;
    let program = mil::text::parse_and_validate(&text).map_err(|e| format!("InvalidMILProgram: {e}"))?;
    check_program(&program)?;
    let mut weights = Weights::new();
    for path in program.blob_paths() {
        let rel = path.strip_prefix(MODEL_PATH).unwrap_or(&path);
        let file = dir.join(rel);
        let bytes = std::fs::read(&file)
            .map_err(|e| format!("{COMPILE_FAILED}: weight file {} ({path}): {e}", file.display()))?;
        weights.insert_file(path.clone(), bytes);
    }
    let cpu = CpuDevice::new(Precision::Fp16).with_dialect(program.dialect);
    let kernel = cpu.compile(&program, &weights).map_err(|e| format!("{COMPILE_FAILED}: {e}"))?;
    let main = program.main().expect("validated programs have a function");
    let inputs = main.inputs.clone();
    let outputs = main.output_vars();
    let order = |vars: &[Var]| -> Vec<usize> {
        let mut order: Vec<usize> = (0..vars.len()).collect();
        if config().alphabetical_binding {
            order.sort_by(|&a, &b| vars[a].name.as_bytes().cmp(vars[b].name.as_bytes()));
        }
        order
    };
    Ok(Compiled {
        name: main.name.clone(),
        input_order: order(&inputs),
        output_order: order(&outputs),
        inputs,
        outputs,
        kernel: Mutex::new(kernel),
    })
}

/// The compile-time rejections in force.
fn check_program(program: &Program) -> Result<(), String> {
    let cfg = config();
    let findings = lint::lint(program);
    if let Some(f) = findings.iter().find(|f| f.severity == Severity::Error) {
        return Err(format!("InvalidMILProgram: {f}"));
    }
    let main = program.main().expect("validated");
    if cfg.rejects(Rule::Cast) {
        if let Some(op) = main.ops.iter().find(|op| op.op == "cast") {
            return Err(format!("InvalidMILProgram: op `{}`: cast is not supported on this chip", op.name));
        }
    }
    let io = main.inputs.iter().cloned().chain(main.output_vars());
    if cfg.rejects(Rule::Rank) {
        let values = main.ops.iter().filter(|op| op.op != "const").flat_map(|op| op.outputs.iter().cloned());
        if let Some(v) = io.clone().chain(values).find(|v| !v.ty.shape.is_empty() && v.ty.shape.len() != 4) {
            return Err(format!(
                "{COMPILE_FAILED}: `{}` has rank {} ({:?}); every tensor must be rank 4",
                v.name,
                v.ty.shape.len(),
                v.ty.shape
            ));
        }
    }
    if cfg.rejects(Rule::Width) {
        if let Some(v) = io.clone().find(|v| v.ty.shape.last().is_some_and(|w| !w.is_multiple_of(WIDTH_MULTIPLE))) {
            return Err(format!(
                "{COMPILE_FAILED}: `{}` has spatial width {}, not a multiple of {WIDTH_MULTIPLE}",
                v.name,
                v.ty.shape.last().unwrap()
            ));
        }
    }
    Ok(())
}

/// `- (BOOL)loadWithQoS:(unsigned int)qos options:(NSDictionary *)options error:(NSError **)error`
extern "C" fn model_load(this: Id, _sel: Sel, qos: u32, options: Id, error: *mut Id) -> i8 {
    const CALL: &str = "loadWithQoS:options:error:";
    with_model(this, CALL, |_| ());
    check_qos(qos, CALL);
    check_options(options, CALL);
    check_error_out(error, CALL);
    let label = model_label(this);
    log_event(&format!("send {CALL} {label}"));
    if crate::take_injected_load_failure() {
        return failed(error, &label, -1, "ANEProgramLoad() Failed (injected by ANETRAIN_ANE_EMU_FAIL_LOADS)");
    }
    let outcome = with_model(this, CALL, |m| match (&m.compiled, m.loaded) {
        (None, _) => Err("the model is not compiled"),
        (Some(_), true) => Err("the model is already loaded"),
        (Some(_), false) => {
            m.loaded = true;
            Ok(())
        }
    });
    match outcome {
        Ok(()) => 1,
        Err(why) => failed(error, &label, -1, &format!("ANEProgramLoad() Failed: {why}")),
    }
}

/// `- (BOOL)unloadWithQoS:(unsigned int)qos error:(NSError **)error`
extern "C" fn model_unload(this: Id, _sel: Sel, qos: u32, error: *mut Id) -> i8 {
    const CALL: &str = "unloadWithQoS:error:";
    with_model(this, CALL, |_| ());
    check_qos(qos, CALL);
    check_error_out(error, CALL);
    let label = model_label(this);
    log_event(&format!("send {CALL} {label}"));
    if with_model(this, CALL, |m| std::mem::replace(&mut m.loaded, false)) {
        1
    } else {
        failed(error, &label, -1, "ANEProgramUnload() Failed: the model is not loaded")
    }
}

/// A surface bound to a request: its object, memory and size.
struct Bound {
    label: String,
    base: *mut u8,
    alloc: usize,
}

/// The IOSurfaces behind an array of `_ANEIOSurfaceObject`s, with the request indices.
fn bound_surfaces(s: &objc::State, array: Id, indices: Id, what: &str) -> Result<Vec<(usize, Bound)>, String> {
    let items = array_items(s, array, &arg("evaluateWithQoS:options:request:error:", what));
    let idx = array_items(s, indices, &arg("evaluateWithQoS:options:request:error:", what));
    let mut out = Vec::new();
    for (i, (&object, &index)) in items.iter().zip(&idx).enumerate() {
        let a = Arg::internal(what);
        let index = number_value(s, index, &a);
        let Body::SurfaceObject(surface) = s.expect(object, Class::SurfaceObject, &a).body else { unreachable!() };
        let o = s.live(surface, &a);
        let Body::Surface(sf) = &o.body else { unreachable!() };
        if sf.lock.is_some() {
            fail(format!("evaluate: {what} surface {i} (IOSurface#{}) is still locked", o.serial));
        }
        let index = usize::try_from(index).map_err(|_| format!("{what} index {index} is negative"))?;
        out.push((
            index,
            Bound {
                label: format!("IOSurface#{}", o.serial),
                base: sf.memory.as_ptr().cast_mut(),
                alloc: sf.memory.len(),
            },
        ));
    }
    Ok(out)
}

/// `- (BOOL)evaluateWithQoS:(unsigned int)qos options:(NSDictionary *)options request:(_ANERequest *)request error:(NSError **)error`
extern "C" fn model_evaluate(this: Id, _sel: Sel, qos: u32, options: Id, request: Id, error: *mut Id) -> i8 {
    const CALL: &str = "evaluateWithQoS:options:request:error:";
    with_model(this, CALL, |_| ());
    check_qos(qos, CALL);
    check_options(options, CALL);
    check_error_out(error, CALL);
    let label = model_label(this);
    log_event(&format!("send {CALL} {label}"));
    let (compiled, loaded, mask) = with_model(this, CALL, |m| (m.compiled.clone(), m.loaded, m.perf_stats_mask));
    let Some(compiled) = compiled.filter(|_| loaded) else {
        return failed(error, &label, -1, "ANEProgramProcessRequestDirect() Failed: the model is not loaded");
    };
    let (inputs, outputs, perf_stats) = {
        let s = state();
        let Body::Request(r) = &s.expect(request, Class::Request, &arg(CALL, "request")).body else { unreachable!() };
        let inputs = bound_surfaces(&s, r.inputs, r.input_indices, "input");
        let outputs = bound_surfaces(&s, r.outputs, r.output_indices, "output");
        (inputs, outputs, r.perf_stats)
    };
    let (inputs, outputs) = match (inputs, outputs) {
        (Ok(i), Ok(o)) => (i, o),
        (Err(e), _) | (_, Err(e)) => return failed(error, &label, -1, &format!("{STATUS_0X1D}: {e}")),
    };
    let started = Instant::now();
    if let Err(e) = run(&compiled, &inputs, &outputs) {
        return failed(error, &label, 0x1d, &format!("{STATUS_0X1D}: program `{}`: {e}", compiled.name));
    }
    let elapsed = started.elapsed().as_nanos().max(1) as u64;
    if !perf_stats.is_null() && mask != 0 {
        if let Body::PerfStats(ns) = &mut state().live_mut(perf_stats, &Arg::internal("perfStats")).body {
            *ns = elapsed;
        }
    }
    1
}

/// The request-time rejections in force, then the program on the CPU.
fn run(compiled: &Compiled, inputs: &[(usize, Bound)], outputs: &[(usize, Bound)]) -> Result<(), String> {
    let cfg = config();
    if cfg.rejects(Rule::MultiInput) && inputs.len() > 1 {
        return Err(format!("{} input surfaces; multi-input requests are rejected", inputs.len()));
    }
    let several = inputs.len() > 1 || outputs.len() > 1;
    for (group, what) in [(inputs, "input"), (outputs, "output")] {
        // The 48 KiB minimum is reported for requests of several surfaces; the reference's
        // single-surface kernels run on exact sizes below it (docs/ANE.md, "Kernel I/O").
        if cfg.rejects(Rule::SmallSurface) && several {
            if let Some((_, b)) = group.iter().find(|(_, b)| b.alloc < MIN_SURFACE_BYTES) {
                return Err(format!("{what} {} is {} bytes, under {MIN_SURFACE_BYTES}", b.label, b.alloc));
            }
        }
        if cfg.rejects(Rule::UnequalSizes) && group.windows(2).any(|w| w[0].1.alloc != w[1].1.alloc) {
            let sizes: Vec<usize> = group.iter().map(|(_, b)| b.alloc).collect();
            return Err(format!("{what} surfaces of unequal sizes {sizes:?}"));
        }
    }
    let bind = |group: &[(usize, Bound)], vars: &[Var], order: &[usize], what: &str| -> Result<Vec<usize>, String> {
        // `slot[d]`: which bound surface holds declared value `d`.
        if group.len() != vars.len() {
            return Err(format!("{} {what} surfaces for {} {what}s", group.len(), vars.len()));
        }
        let mut slot = vec![usize::MAX; vars.len()];
        for (i, (index, b)) in group.iter().enumerate() {
            let declared = *order.get(*index).ok_or_else(|| format!("{what} index {index} out of range"))?;
            if slot[declared] != usize::MAX {
                return Err(format!("{what} index {index} given twice"));
            }
            let need = vars[declared].ty.numel() * vars[declared].ty.dtype.size_bytes();
            if b.alloc < need {
                return Err(format!(
                    "{what} `{}` needs {need} bytes; {} has {}",
                    vars[declared].name, b.label, b.alloc
                ));
            }
            slot[declared] = i;
        }
        Ok(slot)
    };
    let in_slots = bind(inputs, &compiled.inputs, &compiled.input_order, "input")?;
    let out_slots = bind(outputs, &compiled.outputs, &compiled.output_order, "output")?;
    let in_surfaces: Vec<Surface> = compiled
        .inputs
        .iter()
        .zip(&in_slots)
        .map(|(v, &i)| {
            let b = &inputs[i].1;
            // SAFETY: the surface is alive (the request retains it) and unlocked, so the
            // caller is not touching it; `bind` checked its size.
            let bytes = unsafe { std::slice::from_raw_parts(b.base, b.alloc) };
            surface_from_bytes(v, bytes)
        })
        .collect();
    let mut out_surfaces: Vec<Surface> =
        compiled.outputs.iter().map(|v| Surface::zeros(v.ty.dtype, &v.ty.shape)).collect();
    {
        let mut kernel = compiled.kernel.lock().unwrap_or_else(|e| e.into_inner());
        let ins: Vec<&Surface> = in_surfaces.iter().collect();
        let mut outs: Vec<&mut Surface> = out_surfaces.iter_mut().collect();
        kernel.eval(&ins, &mut outs).map_err(|e| e.to_string())?;
    }
    for (surface, &i) in out_surfaces.iter().zip(&out_slots) {
        let b = &outputs[i].1;
        // SAFETY: as above; the output surface is distinct from every input surface
        // (checked by the caller's binding) and is written from byte 0, packed.
        let dst = unsafe { std::slice::from_raw_parts_mut(b.base, b.alloc) };
        write_bytes(surface, dst);
    }
    Ok(())
}

/// A value's packed little-endian bytes (from byte 0) as a surface.
fn surface_from_bytes(v: &Var, bytes: &[u8]) -> Surface {
    let mut s = Surface::zeros(v.ty.dtype, &v.ty.shape);
    match v.ty.dtype {
        DType::Fp16 => {
            let dst = s.as_f16_mut().expect("an fp16 surface");
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = half::f16::from_le_bytes([b[0], b[1]]);
            }
        }
        _ => {
            let dst = s.as_f32_mut().expect("an fp32 surface");
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
    s
}

fn write_bytes(s: &Surface, dst: &mut [u8]) {
    if let Some(v) = s.as_f16() {
        for (d, x) in dst.chunks_exact_mut(2).zip(v) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    } else if let Some(v) = s.as_f32() {
        for (d, x) in dst.chunks_exact_mut(4).zip(v) {
            d.copy_from_slice(&x.to_le_bytes());
        }
    }
}

// --- _ANEIOSurfaceObject, _ANERequest, _ANEPerformanceStats -----------------------------

/// `+ (instancetype)objectWithIOSurface:(IOSurfaceRef)surface`
extern "C" fn surface_object_new(_class: Id, _sel: Sel, surface: Id) -> Id {
    const CALL: &str = "objectWithIOSurface:";
    let mut s = state();
    let what = arg(CALL, "surface");
    s.expect(surface, Class::IOSurface, &what);
    s.retain(surface, &what);
    autorelease(s.create(Class::SurfaceObject, Body::SurfaceObject(surface)))
}

/// `+ (instancetype)requestWithInputs:(NSArray *)inputs inputIndices:(NSArray *)inputIndices
/// outputs:(NSArray *)outputs outputIndices:(NSArray *)outputIndices weightsBuffer:(id)weightsBuffer
/// perfStats:(id)perfStats procedureIndex:(NSNumber *)procedureIndex` — nine arguments, the
/// last three on the stack on x86_64.
#[allow(clippy::too_many_arguments)]
extern "C" fn request_new(
    _class: Id,
    _sel: Sel,
    inputs: Id,
    input_indices: Id,
    outputs: Id,
    output_indices: Id,
    weights_buffer: Id,
    perf_stats: Id,
    procedure_index: Id,
) -> Id {
    const CALL: &str = "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:";
    let mut s = state();
    for (array, indices, a, b) in
        [(inputs, input_indices, "inputs", "inputIndices"), (outputs, output_indices, "outputs", "outputIndices")]
    {
        let items = array_items(&s, array, &arg(CALL, a));
        for (i, &item) in items.iter().enumerate() {
            s.expect(item, Class::SurfaceObject, &arg(CALL, &format!("{a}[{i}]")));
        }
        let idx = array_items(&s, indices, &arg(CALL, b));
        for (i, &n) in idx.iter().enumerate() {
            number_value(&s, n, &arg(CALL, &format!("{b}[{i}]")));
        }
        if items.len() != idx.len() {
            fail(format!("`{CALL}`: {} {a} but {} {b}", items.len(), idx.len()));
        }
    }
    if !weights_buffer.is_null() {
        s.expect(weights_buffer, Class::SurfaceObject, &arg(CALL, "weightsBuffer"));
    }
    if !perf_stats.is_null() {
        s.expect(perf_stats, Class::PerfStats, &arg(CALL, "perfStats"));
    }
    let procedure = number_value(&s, procedure_index, &arg(CALL, "procedureIndex"));
    if procedure != 0 {
        fail(format!("{}: {procedure}; in-memory models have one procedure, 0", arg(CALL, "procedureIndex")));
    }
    let request =
        Request { inputs, input_indices, outputs, output_indices, weights_buffer, perf_stats, procedure_index };
    for p in request.held() {
        s.retain(p, &arg(CALL, "an argument"));
    }
    autorelease(s.create(Class::Request, Body::Request(request)))
}

/// `- (id)perfStats` (+0: owned by the request).
extern "C" fn request_perf_stats(this: Id, _sel: Sel) -> Id {
    let s = state();
    match &s.expect(this, Class::Request, &arg("perfStats", "self")).body {
        Body::Request(r) => r.perf_stats,
        _ => unreachable!("requests are made with their body"),
    }
}

/// `- (instancetype)init`
extern "C" fn perf_stats_init(this: Id, _sel: Sel) -> Id {
    let mut s = state();
    let o = s.live_mut(this, &arg("init", "self"));
    if !matches!(o.body, Body::Uninit) {
        fail(format!("`init` sent to _ANEPerformanceStats#{}, which was already initialised", o.serial));
    }
    o.body = Body::PerfStats(0);
    this
}

/// `- (unsigned long long)hwExecutionTime`: nanoseconds of the last evaluation.
extern "C" fn perf_stats_hw_time(this: Id, _sel: Sel) -> u64 {
    match state().expect(this, Class::PerfStats, &arg("hwExecutionTime", "self")).body {
        Body::PerfStats(ns) => ns,
        _ => 0,
    }
}
