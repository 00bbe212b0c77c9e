//! The Apple Neural Engine as a [`Device`], through the private AppleNeuralEngine
//! framework, loaded at run time.
//!
//! Nothing is linked at build time, so this module compiles, is linted and is unit-tested
//! on every OS; [`AneDevice::open`] is where a system without the framework says so:
//! "ANE not available on this system: AppleNeuralEngine.framework is only on macOS (this
//! is linux)" — an [`ErrorKind::Unavailable`] error, never a panic.
//!
//! The call sequence (DESIGN.md), QoS 21 unless configured:
//! 1. `_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:` — the MIL text
//!    as UTF-8 `NSData`, the weights as `{ "@model_path/weights/NAME.bin": { offset: 0,
//!    data } }` (an empty dictionary, never nil, without weights): see [`ns`];
//! 2. `_ANEInMemoryModel inMemoryModelWithDescriptor:`; `model.mil` and `weights/` are
//!    written to a private directory named by its `hexStringIdentifier`: [`model_dir`];
//! 3. `compileWithQoS:options:error:`, then `loadWithQoS:options:error:` — each compile
//!    counted against the process's budget first: [`budget`];
//! 4. IOSurfaces sized and ordered by the reported binding rules ([`binding`]), wrapped
//!    with `_ANEIOSurfaceObject objectWithIOSurface:`, and one `_ANERequest
//!    requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:`;
//! 5. `evaluateWithQoS:options:request:error:` per eval; on drop `unloadWithQoS:error:`
//!    and the directory is removed.
//!
//! Failures carry the framework's `NSError` description and a hint ([`errors`]). The
//! Objective-C calls themselves are in [`runtime`]; everything that decides *what* to
//! send is plain Rust in the other modules, tested on Linux.
//!
//! At open, the device compiles a tiny program with fp32 I/O and a `cast` to learn its
//! dialect: M3 and later take it (ios18); M1/M2 reject `cast`, and the device falls back
//! to ios16 with fp16 I/O ([`AneDevice::dialect_note`] says why).
//!
//! Nothing in this crate has been run on an ANE by its authors' machines (Linux CI); the
//! probe suite (`anetrain probe --device ane`) is how a Mac user checks it.

pub mod binding;
pub mod budget;
pub mod errors;
pub mod model_dir;
pub mod ns;
pub mod runtime;

use std::path::PathBuf;
use std::ptr;

use mil::builder::FunctionBuilder;
use mil::lint::{self, Severity};
use mil::{DType, Dialect, Program, TensorType, Var};

use crate::{check_binding, Device, Error, ErrorKind, Kernel, Precision, Result, Surface, Weights};
use binding::{BindingRules, SurfacePlan};
use budget::{DEFAULT_COMPILE_LIMIT, PROCESS_COMPILES};
use errors::{framework_error, Step};
use model_dir::ModelDir;
use runtime::{Id, IoSurface, ObjcId, Runtime};

/// The QoS every public ANE user passes (`compileWithQoS:21 …`): 0x15, Apple's
/// `QOS_CLASS_DEFAULT` in `qos_class_t`. What the ANE does with other values (9
/// background, 17 utility, 25 user-initiated, 33 user-interactive) is what the
/// `qos-sweep` probe measures.
pub const DEFAULT_QOS: u32 = 21;

/// How the ANE device compiles and binds.
#[derive(Clone, Debug, PartialEq)]
pub struct AneConfig {
    /// QoS for compile, load, evaluate and unload ([`DEFAULT_QOS`]).
    pub qos: u32,
    /// Compiles this process may do before refusing ([`DEFAULT_COMPILE_LIMIT`]).
    pub compile_limit: usize,
    /// Surface order and sizing ([`BindingRules::default`]: every reported rule).
    pub binding: BindingRules,
    /// The dialect to use; `None` detects it at open (costs one or two compiles).
    pub dialect: Option<Dialect>,
    /// Refuse programs with lint errors (the ANE is reported to reject them or compute
    /// wrongly) before spending a compile on them.
    pub refuse_lint_errors: bool,
    /// A performance-statistics mask to set on each model (`setPerfStatsMask:`) so that
    /// `hwExecutionTime` is reported; `None` leaves the framework's default.
    pub perf_stats_mask: Option<u32>,
    /// Where model directories go; `None` is `NSTemporaryDirectory()`, where the
    /// compiler looks for them.
    pub temp_root: Option<PathBuf>,
}

impl Default for AneConfig {
    fn default() -> AneConfig {
        AneConfig {
            qos: DEFAULT_QOS,
            compile_limit: DEFAULT_COMPILE_LIMIT,
            binding: BindingRules::default(),
            dialect: None,
            refuse_lint_errors: true,
            perf_stats_mask: None,
            temp_root: None,
        }
    }
}

/// Why this system has no ANE device, or `None` if it might (the framework is then
/// loaded to find out).
/// Always `None` when [`runtime::FRAMEWORKS_ENV`] names the images to load (the
/// emulation, on any OS).
pub fn platform_unavailable_reason() -> Option<String> {
    if std::env::var_os(runtime::FRAMEWORKS_ENV).is_some() {
        return None;
    }
    if !cfg!(target_os = "macos") {
        return Some(format!("AppleNeuralEngine.framework is only on macOS (this is {})", std::env::consts::OS));
    }
    if !cfg!(target_arch = "aarch64") {
        return Some(format!("the Neural Engine is part of Apple silicon; this Mac is {}", std::env::consts::ARCH));
    }
    None
}

/// The Apple Neural Engine.
#[derive(Clone, Debug)]
pub struct AneDevice {
    rt: &'static Runtime,
    config: AneConfig,
    dialect: Dialect,
    dialect_note: String,
    temp_root: PathBuf,
}

impl AneDevice {
    /// Opens the ANE with the default configuration.
    pub fn open() -> Result<AneDevice> {
        AneDevice::open_with(AneConfig::default())
    }

    /// Opens the ANE: loads the frameworks and settles the dialect.
    pub fn open_with(config: AneConfig) -> Result<AneDevice> {
        if let Some(reason) = platform_unavailable_reason() {
            return Err(Error::unavailable(reason));
        }
        let rt = Runtime::get().map_err(Error::unavailable)?;
        let temp_root = match &config.temp_root {
            Some(p) => p.clone(),
            None => rt.temporary_directory().map(PathBuf::from).unwrap_or_else(std::env::temp_dir),
        };
        let mut device = AneDevice {
            rt,
            dialect: config.dialect.unwrap_or(Dialect::Ios18),
            dialect_note: "set by configuration".into(),
            config,
            temp_root,
        };
        if device.config.dialect.is_none() {
            device.detect_dialect()?;
        }
        Ok(device)
    }

    pub fn config(&self) -> &AneConfig {
        &self.config
    }

    /// Why the device uses its dialect: configured, or what detection saw.
    pub fn dialect_note(&self) -> &str {
        &self.dialect_note
    }

    /// The same device with another QoS (for the QoS sweep).
    pub fn with_qos(&self, qos: u32) -> AneDevice {
        let mut d = self.clone();
        d.config.qos = qos;
        d
    }

    /// The same device with another perf-stats mask (for the `perf-stats` probe).
    pub fn with_perf_stats_mask(&self, mask: Option<u32>) -> AneDevice {
        let mut d = self.clone();
        d.config.perf_stats_mask = mask;
        d
    }

    /// The same device with other binding rules (for the `io-order` probe).
    pub fn with_binding(&self, binding: BindingRules) -> AneDevice {
        let mut d = self.clone();
        d.config.binding = binding;
        d
    }

    /// Compiles fp32-I/O-with-cast (ios18) and, failing that, fp16-I/O (ios16) test
    /// programs, and keeps the first whose result is right.
    fn detect_dialect(&mut self) -> Result<()> {
        let ios18 = self.try_dialect(Dialect::Ios18);
        let Err(e18) = ios18 else {
            self.dialect = Dialect::Ios18;
            self.dialect_note = "detected: the chip ran a program with fp32 I/O and `cast` (M3 or later)".into();
            return Ok(());
        };
        match self.try_dialect(Dialect::Ios16) {
            Ok(()) => {
                self.dialect = Dialect::Ios16;
                self.dialect_note = format!(
                    "detected: fp32 I/O with `cast` failed ({}), fp16 I/O works (M1/M2); using ios16",
                    first_line(&e18.message)
                );
                Ok(())
            }
            Err(e16) => Err(Error::unavailable(format!(
                "the ANE ran neither dialect's test program; ios18: {}; ios16: {}",
                first_line(&e18.message),
                first_line(&e16.message)
            ))),
        }
    }

    fn try_dialect(&self, dialect: Dialect) -> Result<()> {
        let test = DialectTest::new(dialect);
        let mut d = self.clone();
        d.dialect = dialect;
        let mut kernel = d.compile_kernel(&test.program, &Weights::new())?;
        let mut out =
            Surface::zeros(test.output_dtype, test.program.main().unwrap().output_vars()[0].ty.shape.as_slice());
        kernel.eval(&[&test.input], &mut [&mut out])?;
        test.check(&out)
    }

    /// Compiles `program` into an [`AneKernel`] (what [`Device::compile`] boxes).
    pub fn compile_kernel(&self, program: &Program, weights: &Weights) -> Result<AneKernel> {
        mil::validate(program)?;
        let main = program.main().expect("validated programs have a function");
        let name = main.name.clone();
        if program.dialect != self.dialect {
            return Err(Error::new(
                ErrorKind::Program,
                format!(
                    "program `{name}` is {} but this ANE takes {} ({}); generate programs with `device.dialect()`",
                    program.dialect, self.dialect, self.dialect_note
                ),
            ));
        }
        for path in program.blob_paths() {
            if weights.file(&path).is_none() {
                return Err(Error::new(
                    ErrorKind::Program,
                    format!("program `{name}` reads weight file `{path}`, which was not given"),
                ));
            }
        }
        let findings = lint::lint(program);
        if self.config.refuse_lint_errors && lint::has_errors(&findings) {
            let errors: Vec<String> =
                findings.iter().filter(|f| f.severity == Severity::Error).map(|f| format!("  {f}")).collect();
            return Err(Error::new(
                ErrorKind::Program,
                format!(
                    "program `{name}` has what the ANE is reported to reject or compute wrongly (not compiled, no \
                     budget spent):\n{}",
                    errors.join("\n")
                ),
            ));
        }
        PROCESS_COMPILES.reserve(self.config.compile_limit)?;
        let text = mil::text::print(program);
        Builder { rt: self.rt, config: &self.config, name: &name, findings: &findings }.build(
            program,
            &text,
            weights,
            &self.temp_root,
        )
    }
}

/// One compile's worth of state, so each step can report errors uniformly.
struct Builder<'a> {
    rt: &'static Runtime,
    config: &'a AneConfig,
    name: &'a str,
    findings: &'a [lint::Finding],
}

impl Builder<'_> {
    fn fail(&self, step: Step, description: Option<String>) -> Error {
        framework_error(step, self.name, description.as_deref(), self.findings)
    }

    fn objc(&self, step: Step, what: &str, made: std::result::Result<ObjcId, String>) -> Result<ObjcId> {
        made.map_err(|e| self.fail(step, Some(format!("{what}: {e}"))))
    }

    /// Sends `compileWithQoS:options:error:` or `loadWithQoS:options:error:` to the model.
    fn send_step(&self, loaded: &LoadedModel, step: Step, selector: &str) -> Result<()> {
        let rt = self.rt;
        let mut error: Id = ptr::null_mut();
        // SAFETY: the model is live; both selectors take (unsigned int, NSDictionary *, NSError **).
        let ok = unsafe {
            rt.send_qos_options_error(loaded.model.as_ptr(), selector, loaded.qos, loaded.options.as_ptr(), &mut error)
        };
        if ok {
            Ok(())
        } else {
            Err(self.fail(step, unsafe { rt.description(error) }))
        }
    }

    fn build(
        &self,
        program: &Program,
        text: &str,
        weights: &Weights,
        temp_root: &std::path::Path,
    ) -> Result<AneKernel> {
        let rt = self.rt;
        let _pool = rt.pool();
        let main = program.main().expect("validated");
        let mil_data = self.objc(Step::Descriptor, "the MIL text", rt.make(&ns::mil_text(text)))?;
        let weight_dict = self.objc(Step::Descriptor, "the weights", rt.make(&ns::weights_dictionary(weights)))?;
        // SAFETY (every send in this function): receivers are live objects or classes
        // resolved at load, sent the selectors public ANE users send, with the
        // prototypes `Runtime` declares for them.
        let descriptor = unsafe {
            rt.send_id3(
                rt.class("_ANEInMemoryModelDescriptor"),
                "modelWithMILText:weights:optionsPlist:",
                mil_data.as_ptr(),
                weight_dict.as_ptr(),
                ptr::null_mut(),
            )
        };
        let descriptor = ObjcId::retained(rt, descriptor).ok_or_else(|| self.fail(Step::Descriptor, None))?;
        let model =
            unsafe { rt.send_id1(rt.class("_ANEInMemoryModel"), "inMemoryModelWithDescriptor:", descriptor.as_ptr()) };
        let model = ObjcId::retained(rt, model).ok_or_else(|| self.fail(Step::Model, None))?;
        if let Some(mask) = self.config.perf_stats_mask {
            unsafe {
                if rt.responds_to(model.as_ptr(), "setPerfStatsMask:") {
                    rt.send_void_u32(model.as_ptr(), "setPerfStatsMask:", mask);
                }
            }
        }
        let hex = unsafe { rt.string(rt.send_id(model.as_ptr(), "hexStringIdentifier")) }
            .ok_or_else(|| self.fail(Step::Model, Some("the model has no hexStringIdentifier".into())))?;
        let dir = ModelDir::create(temp_root, &hex, text, weights)?;
        let options = self.objc(Step::Compile, "the options", rt.make(&ns::no_options()))?;
        let mut loaded = LoadedModel { rt, model, options, qos: self.config.qos, loaded: false, dir };
        // Compile once; load, and if that fails, once more after a pause, as the seed's
        // reference bridge does (a load can fail while the ANE reclaims a slot).
        self.send_step(&loaded, Step::Compile, "compileWithQoS:options:error:")?;
        if self.send_step(&loaded, Step::Load, "loadWithQoS:options:error:").is_err() {
            std::thread::sleep(LOAD_RETRY_PAUSE);
            self.send_step(&loaded, Step::Load, "loadWithQoS:options:error:")?;
        }
        loaded.loaded = true;

        let inputs = main.inputs.clone();
        let outputs = main.output_vars();
        let plan = SurfacePlan::new(&inputs, &outputs, &self.config.binding);
        let make_surfaces = |slots: &[binding::Slot]| -> Result<Vec<IoSurface>> {
            slots
                .iter()
                .map(|s| rt.create_surface(s.alloc_bytes).map_err(|e| self.fail(Step::Request, Some(e))))
                .collect()
        };
        let input_surfaces = make_surfaces(&plan.inputs)?;
        let output_surfaces = make_surfaces(&plan.outputs)?;
        let wrap = |surfaces: &[IoSurface]| -> Result<Vec<ObjcId>> {
            surfaces
                .iter()
                .map(|s| {
                    ObjcId::retained(rt, unsafe { rt.surface_object(s.as_ptr()) })
                        .ok_or_else(|| self.fail(Step::Request, Some("_ANEIOSurfaceObject returned nil".into())))
                })
                .collect()
        };
        let input_objects = wrap(&input_surfaces)?;
        let output_objects = wrap(&output_surfaces)?;
        let perf_stats = match self.config.perf_stats_mask {
            Some(_) => Some(performance_stats(rt).map_err(|e| self.fail(Step::Request, Some(e)))?),
            None => None,
        };
        let perf_stats_ptr = perf_stats.as_ref().map_or(ptr::null_mut(), ObjcId::as_ptr);
        let request = make_request(rt, &input_objects, &output_objects, ptr::null_mut(), perf_stats_ptr)
            .map_err(|e| self.fail(Step::Request, Some(e)))?;
        Ok(AneKernel {
            request,
            perf_stats,
            input_objects,
            output_objects,
            input_surfaces,
            output_surfaces,
            loaded,
            plan,
            inputs,
            outputs,
            name: self.name.to_string(),
            findings: self.findings.to_vec(),
            scratch: Vec::new(),
            last_hw_time_ns: None,
        })
    }
}

/// How long to wait before the one retry of a failed load: the seed's reference bridge
/// (`bridge/ane_bridge.m`) sleeps 100 ms "for ANE slot reclamation".
pub const LOAD_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);

/// `[[_ANEPerformanceStats alloc] init]`: what the request's `perfStats:` must be for the
/// driver to report `hwExecutionTime` (the seed's `training/m5result.md`: set the model's
/// `perfStatsMask`, pass a stats object to the request, read it after eval).
fn performance_stats(rt: &'static Runtime) -> std::result::Result<ObjcId, String> {
    let class = rt.class("_ANEPerformanceStats");
    if class.is_null() {
        return Err("this AppleNeuralEngine.framework has no _ANEPerformanceStats class".into());
    }
    // SAFETY: +alloc and -init are NSObject's, with these prototypes.
    let made = unsafe { rt.send_id(rt.send_id(class, "alloc"), "init") };
    ObjcId::owned(rt, made).ok_or_else(|| "_ANEPerformanceStats init returned nil".into())
}

/// `_ANERequest` over wrapped surfaces in ANE order, indices `0..n`, procedure 0.
fn make_request(
    rt: &'static Runtime,
    inputs: &[ObjcId],
    outputs: &[ObjcId],
    weights_buffer: Id,
    perf_stats: Id,
) -> std::result::Result<ObjcId, String> {
    let ins = rt.array(&inputs.iter().map(ObjcId::as_ptr).collect::<Vec<_>>());
    let outs = rt.array(&outputs.iter().map(ObjcId::as_ptr).collect::<Vec<_>>());
    let in_idx = rt.make(&ns::indices(inputs.len()))?;
    let out_idx = rt.make(&ns::indices(outputs.len()))?;
    let procedure = rt.make(&ns::NsValue::Int(0))?;
    // SAFETY: all arguments are live objects of the kinds the factory takes, or nil.
    let request = unsafe {
        rt.request(
            ins.as_ptr(),
            in_idx.as_ptr(),
            outs.as_ptr(),
            out_idx.as_ptr(),
            weights_buffer,
            perf_stats,
            procedure.as_ptr(),
        )
    };
    ObjcId::retained(rt, request).ok_or_else(|| "_ANERequest returned nil".to_string())
}

/// A compiled model and its directory; unloaded (if loaded) before either is released.
struct LoadedModel {
    rt: &'static Runtime,
    model: ObjcId,
    options: ObjcId,
    qos: u32,
    loaded: bool,
    // Declared last: removed after the model is released.
    dir: ModelDir,
}

impl LoadedModel {
    fn unload(&mut self) -> std::result::Result<(), Option<String>> {
        // SAFETY: the model is live.
        if !self.loaded || !unsafe { self.rt.responds_to(self.model.as_ptr(), "unloadWithQoS:error:") } {
            return Ok(());
        }
        let _pool = self.rt.pool();
        let mut error: Id = ptr::null_mut();
        // SAFETY: a loaded model answers unloadWithQoS:error:.
        let ok = unsafe { self.rt.send_unload(self.model.as_ptr(), self.qos, &mut error) };
        self.loaded = false;
        if ok {
            Ok(())
        } else {
            Err(unsafe { self.rt.description(error) })
        }
    }
}

impl Drop for LoadedModel {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; the process's exit unloads too.
        let _ = self.unload();
    }
}

/// A program compiled and loaded on the ANE, with its surfaces and request.
///
/// Teardown follows the seed's reference (`ane_bridge_free`): the model is unloaded
/// first (in `Drop::drop`, before any field goes), then the fields drop in declaration
/// order: the request, the objects it held, the surfaces, the model, its directory.
pub struct AneKernel {
    request: ObjcId,
    /// The `_ANEPerformanceStats` the request reports into, when timing was asked for.
    perf_stats: Option<ObjcId>,
    input_objects: Vec<ObjcId>,
    output_objects: Vec<ObjcId>,
    input_surfaces: Vec<IoSurface>,
    output_surfaces: Vec<IoSurface>,
    loaded: LoadedModel,
    plan: SurfacePlan,
    inputs: Vec<Var>,
    outputs: Vec<Var>,
    name: String,
    findings: Vec<lint::Finding>,
    /// Packed bytes of one surface, reused across evals.
    scratch: Vec<u8>,
    last_hw_time_ns: Option<u64>,
}

impl Drop for AneKernel {
    fn drop(&mut self) {
        // Nothing to report to from a destructor; the process's exit unloads too.
        let _ = self.loaded.unload();
    }
}

impl AneKernel {
    /// The binding plan in force (ANE order and allocation sizes).
    pub fn plan(&self) -> &SurfacePlan {
        &self.plan
    }

    /// Where the compiler's model directory is.
    pub fn model_dir(&self) -> &std::path::Path {
        self.loaded.dir.path()
    }

    /// Unloads, rewrites the weight files in the model directory, and loads again —
    /// without compiling (the Orion paper's "delta reload"). Whether the new weights
    /// take effect is what the `weight-reload` probe checks; the seed experiments report
    /// they do not without an unload.
    pub fn reload_weights(&mut self, weights: &Weights) -> Result<()> {
        let rt = self.loaded.rt;
        self.loaded.unload().map_err(|d| framework_error(Step::Unload, &self.name, d.as_deref(), &[]))?;
        self.loaded.dir.rewrite_weights(weights)?;
        let _pool = rt.pool();
        let mut error: Id = ptr::null_mut();
        // SAFETY: as in `Builder::build`.
        let ok = unsafe {
            rt.send_qos_options_error(
                self.loaded.model.as_ptr(),
                "loadWithQoS:options:error:",
                self.loaded.qos,
                self.loaded.options.as_ptr(),
                &mut error,
            )
        };
        if !ok {
            return Err(framework_error(
                Step::Load,
                &self.name,
                unsafe { rt.description(error) }.as_deref(),
                &self.findings,
            ));
        }
        self.loaded.loaded = true;
        Ok(())
    }

    /// Evaluates with a request whose `weightsBuffer:` is an IOSurface holding
    /// `buffer` (a weight file's bytes). The seed experiments report it changes nothing;
    /// the `weights-buffer` probe checks.
    pub fn eval_with_weights_buffer(
        &mut self,
        inputs: &[&Surface],
        outputs: &mut [&mut Surface],
        buffer: &[u8],
    ) -> Result<()> {
        let rt = self.loaded.rt;
        let _pool = rt.pool();
        let fail = |e: String| framework_error(Step::Request, &self.name, Some(&e), &[]);
        let surface = rt.create_surface(binding::alloc_size(buffer.len(), &BindingRules::none())).map_err(fail)?;
        surface
            .with_write(|mem, layout| binding::write_rows(buffer, mem, layout, "weights buffer"))
            .map_err(fail)??;
        let object = ObjcId::retained(rt, unsafe { rt.surface_object(surface.as_ptr()) })
            .ok_or_else(|| fail("_ANEIOSurfaceObject returned nil".into()))?;
        let perf_stats = self.perf_stats.as_ref().map_or(ptr::null_mut(), ObjcId::as_ptr);
        let request =
            make_request(rt, &self.input_objects, &self.output_objects, object.as_ptr(), perf_stats).map_err(fail)?;
        self.eval_request(inputs, outputs, request.as_ptr())
    }

    fn eval_request(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface], request: Id) -> Result<()> {
        check_binding("input", &self.inputs, inputs)?;
        check_binding("output", &self.outputs, &outputs.iter().map(|s| &**s).collect::<Vec<_>>())?;
        let rt = self.loaded.rt;
        let surface_error = |e: String| Error::new(ErrorKind::Eval, format!("ANE kernel `{}`: {e}", self.name));
        for (slot, io) in self.plan.inputs.iter().zip(&self.input_surfaces) {
            binding::surface_bytes(inputs[slot.declared], &mut self.scratch);
            let what = format!("input `{}`", slot.name);
            io.with_write(|mem, layout| binding::write_rows(&self.scratch, mem, layout, &what))
                .map_err(surface_error)??;
        }
        let _pool = rt.pool();
        let mut error: Id = ptr::null_mut();
        // SAFETY: model and request are live; the request's surfaces are unlocked.
        let ok = unsafe {
            rt.send_evaluate(
                self.loaded.model.as_ptr(),
                self.loaded.qos,
                self.loaded.options.as_ptr(),
                request,
                &mut error,
            )
        };
        if !ok {
            self.last_hw_time_ns = None;
            return Err(framework_error(Step::Eval, &self.name, unsafe { rt.description(error) }.as_deref(), &[]));
        }
        for (slot, io) in self.plan.outputs.iter().zip(&self.output_surfaces) {
            self.scratch.resize(slot.data_bytes, 0);
            let what = format!("output `{}`", slot.name);
            io.with_read(|mem, layout| binding::read_rows(mem, layout, &mut self.scratch, &what))
                .map_err(surface_error)??;
            binding::fill_surface(outputs[slot.declared], &self.scratch)?;
        }
        self.last_hw_time_ns = hw_execution_time(rt, request);
        Ok(())
    }
}

/// `request.perfStats.hwExecutionTime`, where the framework reports one (needs a perf
/// stats mask on some systems; 0 means "not measured").
fn hw_execution_time(rt: &'static Runtime, request: Id) -> Option<u64> {
    // SAFETY: the request is live, and both selectors are checked with respondsToSelector:.
    unsafe {
        if !rt.responds_to(request, "perfStats") {
            return None;
        }
        let stats = rt.send_id(request, "perfStats");
        if !rt.responds_to(stats, "hwExecutionTime") {
            return None;
        }
        Some(rt.send_u64(stats, "hwExecutionTime")).filter(|&ns| ns > 0)
    }
}

impl Kernel for AneKernel {
    fn inputs(&self) -> &[Var] {
        &self.inputs
    }

    fn outputs(&self) -> &[Var] {
        &self.outputs
    }

    fn eval(&mut self, inputs: &[&Surface], outputs: &mut [&mut Surface]) -> Result<()> {
        let request = self.request.as_ptr();
        self.eval_request(inputs, outputs, request)
    }

    fn last_hw_time_ns(&self) -> Option<u64> {
        self.last_hw_time_ns
    }
}

impl Device for AneDevice {
    fn name(&self) -> &str {
        "ane"
    }

    fn dialect(&self) -> Dialect {
        self.dialect
    }

    fn precision(&self) -> Precision {
        Precision::Fp16
    }

    fn compile(&self, program: &Program, weights: &Weights) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(self.compile_kernel(program, weights)?))
    }

    fn compiles_left(&self) -> Option<usize> {
        Some(PROCESS_COMPILES.left(self.config.compile_limit))
    }

    fn compiles_done(&self) -> usize {
        PROCESS_COMPILES.done()
    }
}

/// The program the device opens with to learn its dialect: `y = 2·x` on a 48 KiB
/// surface, with fp32 I/O and casts for ios18, fp16 I/O for ios16; and its check.
pub struct DialectTest {
    pub program: Program,
    pub input: Surface,
    pub output_dtype: DType,
}

impl DialectTest {
    /// Channels and width of the test surface: 64 × 192 fp32 or 128 × 192 fp16 is
    /// 48 KiB, the reported minimum, with a width that is a multiple of 16.
    const WIDTH: usize = 192;

    pub fn new(dialect: Dialect) -> DialectTest {
        let (io, channels) = match dialect {
            Dialect::Ios18 => (DType::Fp32, 64),
            Dialect::Ios16 => (DType::Fp16, 128),
        };
        let mut b = FunctionBuilder::new("main", dialect);
        let x = b.input("x", TensorType::surface(io, channels, Self::WIDTH));
        let x16 = if io == DType::Fp16 { x } else { b.cast("x16", &x, DType::Fp16) };
        let doubled = b.scale("doubled", &x16, 2.0);
        let y = if io == DType::Fp16 { doubled } else { b.cast("y", &doubled, DType::Fp32) };
        b.output(&y);
        let program = Program::new(dialect, b.finish().expect("the dialect test program is well-typed"));
        // Small integers: exact in fp16 and after doubling.
        let values: Vec<f32> = (0..channels * Self::WIDTH).map(|i| (i % 97) as f32 - 48.0).collect();
        let input = Surface::from_f32(io, &[1, channels, 1, Self::WIDTH], &values);
        DialectTest { program, input, output_dtype: io }
    }

    /// Ok if `out` is exactly twice the input.
    pub fn check(&self, out: &Surface) -> Result<()> {
        let want: Vec<f32> = self.input.to_f32().iter().map(|v| 2.0 * v).collect();
        match out.to_f32().iter().zip(&want).position(|(g, w)| g != w) {
            None => Ok(()),
            Some(i) => Err(Error::new(
                ErrorKind::Eval,
                format!("the dialect test computed {} at element {i}, expected {}", out.to_f32()[i], want[i]),
            )),
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
