//! MIL text → [`Program`], by recursive descent over the lexer's tokens.
//!
//! The parser checks grammar and literals only: a literal must fit its declared type
//! (`int32(1.5)` and three values for a `[4]` tensor are errors here), but whether ops
//! exist, names are defined and types agree is [`crate::validate`]'s job. Every error
//! carries the line:column of the token at fault and says what was expected and what
//! was found. Nesting (tuples, literal lists) is bounded so no input exhausts the stack.

use super::lexer::{tokenize, Tok, Token};
use crate::ir::{Arg, DType, Data, Dialect, Function, Operation, Program, Span, TensorType, Value, Var};
use crate::{mil_err, Error, ErrorKind, Result};

/// Deepest nesting the parser follows, counted separately for tuples, for the lists of
/// one literal, and for BLOBFILE values: far beyond any real program, and shallow
/// enough that recursion cannot exhaust the stack. The printer writes literals of
/// higher rank flat, so that whatever parses also prints into something that parses.
pub(super) const MAX_DEPTH: usize = 64;

/// Largest dimension a tensor type may declare. The ANE's reported limit is 65536; this
/// bound is looser (it is the parser's job to read, the lint's to judge) but keeps the
/// shape arithmetic of type inference, done in i64, far from overflow.
const MAX_DIM: usize = i32::MAX as usize;

pub(super) fn program(text: &str) -> Result<Program> {
    let mut p = Parser { toks: tokenize(text)?, pos: 0 };
    p.program()
}

struct Parser {
    /// Never empty: the lexer always ends with [`Tok::Eof`].
    toks: Vec<Token>,
    pos: usize,
}

/// A literal's list before it is checked against the declared shape.
enum Tree {
    Leaf(Token),
    List(Vec<Tree>, Span),
}

impl Parser {
    // ---- token helpers ----

    fn peek(&self) -> &Tok {
        &self.toks[self.pos].tok
    }

    fn peek_at(&self, n: usize) -> &Tok {
        &self.toks[(self.pos + n).min(self.toks.len() - 1)].tok
    }

    fn span(&self) -> Span {
        self.toks[self.pos].span
    }

    /// Takes the current token; at the end, keeps returning [`Tok::Eof`].
    fn bump(&mut self) -> Token {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn is_punct(&self, c: char) -> bool {
        *self.peek() == Tok::Punct(c)
    }

    fn eat_punct(&mut self, c: char) -> bool {
        let here = self.is_punct(c);
        if here {
            self.bump();
        }
        here
    }

    fn is_ident(&self, s: &str) -> bool {
        matches!(self.peek(), Tok::Ident(i) if i == s)
    }

    /// An error of `kind` at the current token.
    fn error(&self, kind: ErrorKind, message: String) -> Error {
        Error::new(kind, message).at(self.span())
    }

    /// "expected {what}, found {the current token}".
    fn expected(&self, what: &str) -> Error {
        self.error(ErrorKind::Syntax, format!("expected {what}, found {}", self.peek().describe()))
    }

    /// Takes punctuation `c`, or says "expected `c` {context}, found …".
    fn expect_punct(&mut self, c: char, context: &str) -> Result<()> {
        if self.eat_punct(c) {
            Ok(())
        } else {
            Err(self.expected(&format!("`{c}` {context}")))
        }
    }

    fn expect_keyword(&mut self, keyword: &str, context: &str) -> Result<Span> {
        if self.is_ident(keyword) {
            Ok(self.bump().span)
        } else {
            Err(self.expected(&format!("`{keyword}` {context}")))
        }
    }

    /// Takes an identifier, or says "expected {what}, found …".
    fn expect_ident(&mut self, what: &str) -> Result<(String, Span)> {
        match self.peek().clone() {
            Tok::Ident(s) => Ok((s, self.bump().span)),
            _ => Err(self.expected(what)),
        }
    }

    /// Whether a typed literal starts here: `tensor<` or a scalar type followed by `(`.
    fn at_value(&self) -> bool {
        match (self.peek(), self.peek_at(1)) {
            (Tok::Ident(t), Tok::Punct('<')) => t == "tensor",
            (Tok::Ident(t), Tok::Punct('(')) => DType::from_mil_name(t).is_some(),
            _ => false,
        }
    }

    // ---- program structure ----

    /// `program(1.3) [buildInfo = …] { func … }`
    fn program(&mut self) -> Result<Program> {
        self.expect_keyword("program", "at the start of a MIL program")?;
        self.expect_punct('(', "after `program`")?;
        let version_span = self.span();
        let dialect = match self.peek().clone() {
            Tok::Number(v) => {
                self.bump();
                match v.as_str() {
                    "1.3" => Dialect::Ios18,
                    "1.0" | "1" => Dialect::Ios16,
                    _ => {
                        return Err(mil_err!(
                            Syntax,
                            "unsupported program version `{v}`: expected 1.3 (ios18) or 1.0 (ios16)"
                        )
                        .at(version_span))
                    }
                }
            }
            _ => return Err(self.expected("the program version (1.3 or 1.0)")),
        };
        self.expect_punct(')', "after the program version")?;
        let build_info = if self.is_punct('[') { self.program_attributes()? } else { Vec::new() };
        self.expect_punct('{', "to open the program body")?;
        let mut functions = Vec::new();
        while self.is_ident("func") {
            functions.push(self.function()?);
        }
        if functions.is_empty() {
            return Err(self.expected("`func`: a program needs at least one function"));
        }
        if !self.eat_punct('}') {
            return Err(self.expected("`func` or `}` closing the program"));
        }
        if *self.peek() != Tok::Eof {
            return Err(self.expected("end of input after the program's closing `}`"));
        }
        Ok(Program { dialect, build_info, functions })
    }

    /// `[buildInfo = dict<string, string>({{"k", "v"}, …})]`, the only program attribute.
    fn program_attributes(&mut self) -> Result<Vec<(String, String)>> {
        self.bump(); // `[`
        let mut build_info = None;
        loop {
            let (key, key_span) = self.expect_ident("a program attribute name (`buildInfo`)")?;
            if key != "buildInfo" {
                return Err(
                    mil_err!(Syntax, "unknown program attribute `{key}`: only `buildInfo` is supported").at(key_span)
                );
            }
            if build_info.is_some() {
                return Err(mil_err!(Syntax, "program attribute `buildInfo` is given twice").at(key_span));
            }
            self.expect_punct('=', "after `buildInfo`")?;
            build_info = Some(self.string_dict()?);
            if !self.eat_punct(',') {
                break;
            }
        }
        self.expect_punct(']', "after the program attributes")?;
        Ok(build_info.unwrap_or_default())
    }

    /// `dict<string, string>({{"k", "v"}, …})`; either string form in the `dict<…>`.
    fn string_dict(&mut self) -> Result<Vec<(String, String)>> {
        self.expect_keyword("dict", "as the value of `buildInfo`")?;
        self.expect_punct('<', "after `dict`")?;
        for (i, what) in ["the dict's key type", "the dict's value type"].into_iter().enumerate() {
            let span = self.span();
            let ty = self.ty(what)?;
            if ty != TensorType::scalar(DType::String) {
                return Err(mil_err!(BadLiteral, "buildInfo keys and values are strings, found {ty}").at(span));
            }
            if i == 0 {
                self.expect_punct(',', "between the dict's key and value types")?;
            }
        }
        self.expect_punct('>', "to close `dict<…>`")?;
        self.expect_punct('(', "before the dict's entries")?;
        self.expect_punct('{', "to open the dict's entries")?;
        let mut entries = Vec::new();
        if !self.is_punct('}') {
            loop {
                self.expect_punct('{', "to open a dict entry `{\"key\", \"value\"}`")?;
                let key = self.string_token("the entry's key (a string)")?;
                self.expect_punct(',', "after the entry's key")?;
                let value = self.string_token("the entry's value (a string)")?;
                self.expect_punct('}', "to close the dict entry")?;
                entries.push((key, value));
                if !self.eat_punct(',') {
                    break;
                }
            }
        }
        self.expect_punct('}', "to close the dict's entries")?;
        self.expect_punct(')', "after the dict's entries")?;
        Ok(entries)
    }

    fn string_token(&mut self, what: &str) -> Result<String> {
        match self.peek().clone() {
            Tok::Str(s) => {
                self.bump();
                Ok(s)
            }
            _ => Err(self.expected(what)),
        }
    }

    /// `func main<ios18>(T x, …) { ops } -> (outputs);`
    fn function(&mut self) -> Result<Function> {
        let span = self.bump().span; // `func`
        let (name, _) = self.expect_ident("the function's name after `func`")?;
        self.expect_punct('<', "before the function's opset (`main<ios18>`)")?;
        let (opset, _) = self.expect_ident("the function's opset (`ios18`, `ios16`)")?;
        self.expect_punct('>', "after the function's opset")?;
        self.expect_punct('(', "to open the function's inputs")?;
        let mut inputs = Vec::new();
        if !self.is_punct(')') {
            loop {
                let ty = self.ty("an input's type")?;
                let (input, _) = self.expect_ident("the input's name after its type")?;
                inputs.push(Var::new(input, ty));
                if !self.eat_punct(',') {
                    break;
                }
            }
        }
        self.expect_punct(')', "after the function's inputs")?;
        self.expect_punct('{', "to open the function body")?;
        let mut ops = Vec::new();
        while !self.is_punct('}') {
            if !matches!(self.peek(), Tok::Ident(_) | Tok::Punct('(')) {
                return Err(self.expected("an op (`TYPE NAME = OP(…)[…];`) or `}` closing the function body"));
            }
            ops.push(self.op()?);
        }
        self.bump(); // `}`
        if *self.peek() != Tok::Arrow {
            return Err(self.expected("`->` and the function's outputs after its body"));
        }
        self.bump();
        self.expect_punct('(', "to open the function's outputs")?;
        let mut outputs = Vec::new();
        if !self.is_punct(')') {
            loop {
                outputs.push(self.expect_ident("an output name")?.0);
                if !self.eat_punct(',') {
                    break;
                }
            }
        }
        self.expect_punct(')', "after the function's outputs")?;
        self.expect_punct(';', "after the function's outputs")?;
        Ok(Function { name, opset, inputs, ops, outputs, span })
    }

    /// `T a = op(x = …, …)[name = string("a"), …];`, also with several results
    /// (`T a, T b = …` or `(T a, T b) = …`) and without the attribute list.
    fn op(&mut self) -> Result<Operation> {
        let span = self.span();
        let outputs = if self.eat_punct('(') {
            let outputs = self.results()?;
            self.expect_punct(')', "after the op's results")?;
            outputs
        } else {
            self.results()?
        };
        self.expect_punct('=', "after the op's results")?;
        let (op, _) = self.expect_ident("the op type after `=`")?;
        self.expect_punct('(', &format!("after the op type `{op}`"))?;
        let mut args = Vec::new();
        if !self.is_punct(')') {
            loop {
                let (arg_name, _) = self.expect_ident("an argument name")?;
                self.expect_punct('=', &format!("after argument name `{arg_name}`"))?;
                let arg = self.arg(0)?;
                args.push((arg_name, arg));
                if !self.eat_punct(',') {
                    break;
                }
            }
        }
        self.expect_punct(')', "after the arguments")?;
        let mut name = None;
        let mut attrs: Vec<(String, Value)> = Vec::new();
        if self.eat_punct('[') && !self.is_punct(']') {
            loop {
                let (key, key_span) = self.expect_ident("an attribute name")?;
                if (key == "name" && name.is_some()) || attrs.iter().any(|(k, _)| *k == key) {
                    return Err(mil_err!(Syntax, "attribute `{key}` is given twice").at(key_span));
                }
                self.expect_punct('=', &format!("after attribute name `{key}`"))?;
                let value_span = self.span();
                let value = self.value(0)?;
                if key == "name" {
                    let s = value.as_str().ok_or_else(|| {
                        mil_err!(BadLiteral, "the op's `name` must be a string, found {}", value.ty()).at(value_span)
                    })?;
                    name = Some(s.to_string());
                } else {
                    attrs.push((key, value));
                }
                if !self.eat_punct(',') {
                    break;
                }
            }
            self.expect_punct(']', "after the op's attributes")?;
        }
        self.expect_punct(';', "after the op")?;
        let name = name.unwrap_or_else(|| outputs[0].name.clone());
        Ok(Operation { op, name, outputs, args, attrs, span })
    }

    /// `T a, T b`: at least one typed name.
    fn results(&mut self) -> Result<Vec<Var>> {
        let mut out = Vec::new();
        loop {
            let ty = self.ty("the op's result type")?;
            let (name, _) = self.expect_ident("the result's name after its type")?;
            out.push(Var::new(name, ty));
            if !self.eat_punct(',') {
                return Ok(out);
            }
        }
    }

    /// An argument: a name, a typed literal, or a tuple `(a, b)`.
    fn arg(&mut self, depth: usize) -> Result<Arg> {
        if depth > MAX_DEPTH {
            return Err(self.error(ErrorKind::Syntax, format!("tuples nest deeper than {MAX_DEPTH} levels")));
        }
        if self.eat_punct('(') {
            let mut items = Vec::new();
            if !self.is_punct(')') {
                loop {
                    items.push(self.arg(depth + 1)?);
                    if !self.eat_punct(',') {
                        break;
                    }
                }
            }
            self.expect_punct(')', "to close the tuple")?;
            return Ok(Arg::List(items));
        }
        if self.at_value() {
            return Ok(Arg::Value(self.value(depth)?));
        }
        match self.peek().clone() {
            Tok::Ident(name) => {
                self.bump();
                Ok(Arg::Var(name))
            }
            _ => Err(self.expected("a value name, a typed literal (`fp16(1)`) or a tuple `(a, b)`")),
        }
    }

    // ---- types and literals ----

    /// `tensor<fp16, [1, 64, 1, 32]>`, or a scalar type in short form (`fp16`).
    fn ty(&mut self, what: &str) -> Result<TensorType> {
        match self.peek().clone() {
            Tok::Ident(t) if t == "tensor" => {
                self.bump();
                self.expect_punct('<', "after `tensor`")?;
                let dtype = self.dtype()?;
                self.expect_punct(',', "after the element type")?;
                let shape_span = self.span();
                self.expect_punct('[', "to open the shape")?;
                let mut shape = Vec::new();
                if !self.is_punct(']') {
                    loop {
                        shape.push(self.dim()?);
                        if !self.eat_punct(',') {
                            break;
                        }
                    }
                }
                self.expect_punct(']', "to close the shape")?;
                self.expect_punct('>', "to close the tensor type")?;
                if shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none() {
                    return Err(
                        mil_err!(Syntax, "shape {shape:?} has more elements than a tensor can hold").at(shape_span)
                    );
                }
                Ok(TensorType::new(dtype, shape))
            }
            Tok::Ident(t) => match DType::from_mil_name(&t) {
                Some(dtype) => {
                    self.bump();
                    Ok(TensorType::scalar(dtype))
                }
                // `int8 q`, `fp64 v`: a type this crate does not know, not a stray name.
                None if ["int", "uint", "fp"].iter().any(|p| t.starts_with(p)) => {
                    Err(self.error(ErrorKind::Syntax, format!("unknown element type `{t}`; known: {}", dtype_names())))
                }
                None => Err(self.expected(&format!("{what} (`tensor<…>` or a scalar type like `fp16`)"))),
            },
            _ => Err(self.expected(&format!("{what} (`tensor<…>` or a scalar type like `fp16`)"))),
        }
    }

    fn dtype(&mut self) -> Result<DType> {
        match self.peek().clone() {
            Tok::Ident(t) => match DType::from_mil_name(&t) {
                Some(d) => {
                    self.bump();
                    Ok(d)
                }
                None => {
                    Err(self.error(ErrorKind::Syntax, format!("unknown element type `{t}`; known: {}", dtype_names())))
                }
            },
            _ => Err(self.expected("an element type (`fp16`, `int32`, …)")),
        }
    }

    fn dim(&mut self) -> Result<usize> {
        match self.peek().clone() {
            Tok::Number(s) => match s.parse::<usize>() {
                Ok(d) if d <= MAX_DIM && !s.starts_with('+') => {
                    self.bump();
                    Ok(d)
                }
                Ok(_) => Err(self.error(ErrorKind::Syntax, format!("dimension {s} is larger than {MAX_DIM}"))),
                Err(_) => Err(self.expected("a dimension (a non-negative integer)")),
            },
            _ => Err(self.expected("a dimension (a non-negative integer) or `]`")),
        }
    }

    /// A typed literal: `fp16(2)`, `tensor<int32, [2]>([1, 1])`, `tensor<…>(BLOBFILE(…))`.
    fn value(&mut self, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(self.error(ErrorKind::Syntax, format!("literals nest deeper than {MAX_DEPTH} levels")));
        }
        let span = self.span();
        let ty = self.ty("a typed literal")?;
        self.expect_punct('(', &format!("after the literal's type {ty}"))?;
        let value = if self.is_ident("BLOBFILE") {
            self.blobfile(ty, depth)?
        } else if ty.is_scalar() {
            if self.is_punct('[') {
                return Err(self.error(ErrorKind::BadLiteral, format!("a scalar {ty} takes one value, found a list")));
            }
            let mut data = empty_data(ty.dtype);
            let token = self.literal_token(&ty)?;
            push_element(&mut data, &token, ty.dtype)?;
            Value::Literal { ty, data }
        } else {
            if !self.is_punct('[') {
                let kind = if matches!(self.peek(), Tok::Number(_) | Tok::Ident(_) | Tok::Str(_)) {
                    ErrorKind::BadLiteral
                } else {
                    ErrorKind::Syntax
                };
                let found = self.peek().describe();
                return Err(self.error(kind, format!("a {ty} literal takes its values in `[…]`, found {found}")));
            }
            let tree = self.tree(0)?;
            let mut data = empty_data(ty.dtype);
            fill(&tree, &ty, span, &mut data)?;
            Value::Literal { ty, data }
        };
        self.expect_punct(')', "to close the literal")?;
        Ok(value)
    }

    /// One element token: a number, `true`/`false`/`inf`/`nan`, or a string.
    fn literal_token(&mut self, ty: &TensorType) -> Result<Token> {
        match self.peek() {
            Tok::Number(_) | Tok::Ident(_) | Tok::Str(_) => Ok(self.bump()),
            _ => Err(self.expected(&format!("a {} value", ty.dtype))),
        }
    }

    /// `[…]`, nested to any depth up to [`MAX_DEPTH`], with value tokens as leaves.
    fn tree(&mut self, depth: usize) -> Result<Tree> {
        if depth > MAX_DEPTH {
            return Err(self.error(ErrorKind::Syntax, format!("lists nest deeper than {MAX_DEPTH} levels")));
        }
        let span = self.span();
        if self.eat_punct('[') {
            let mut items = Vec::new();
            if !self.is_punct(']') {
                loop {
                    items.push(self.tree(depth + 1)?);
                    if !self.eat_punct(',') {
                        break;
                    }
                }
            }
            self.expect_punct(']', "to close the list")?;
            return Ok(Tree::List(items, span));
        }
        match self.peek() {
            Tok::Number(_) | Tok::Ident(_) | Tok::Str(_) => Ok(Tree::Leaf(self.bump())),
            _ => Err(self.expected("a value or `[`")),
        }
    }

    /// `BLOBFILE(path = string("@model_path/…"), offset = uint64(64))`, either form.
    fn blobfile(&mut self, ty: TensorType, depth: usize) -> Result<Value> {
        let blob_span = self.bump().span; // `BLOBFILE`
        self.expect_punct('(', "after `BLOBFILE`")?;
        let (mut path, mut offset) = (None, None);
        loop {
            let (key, key_span) = self.expect_ident("`path` or `offset` in `BLOBFILE(…)`")?;
            self.expect_punct('=', &format!("after `{key}`"))?;
            let value_span = self.span();
            let value = self.value(depth + 1)?;
            let slot_given = match key.as_str() {
                "path" => {
                    let s = value.as_str().ok_or_else(|| {
                        mil_err!(BadLiteral, "BLOBFILE `path` must be a string, found {}", value.ty()).at(value_span)
                    })?;
                    path.replace(s.to_string()).is_some()
                }
                "offset" => {
                    let o = match (&value, value.as_int()) {
                        (Value::Literal { ty, .. }, Some(o)) if *ty == TensorType::scalar(DType::Uint64) => o as u64,
                        _ => {
                            return Err(mil_err!(
                                BadLiteral,
                                "BLOBFILE `offset` must be a uint64, found {}",
                                value.ty()
                            )
                            .at(value_span))
                        }
                    };
                    offset.replace(o).is_some()
                }
                _ => {
                    return Err(mil_err!(Syntax, "BLOBFILE takes `path` and `offset`, found `{key}`").at(key_span));
                }
            };
            if slot_given {
                return Err(mil_err!(Syntax, "BLOBFILE `{key}` is given twice").at(key_span));
            }
            if !self.eat_punct(',') {
                break;
            }
        }
        self.expect_punct(')', "to close `BLOBFILE(…)`")?;
        match (path, offset) {
            (Some(path), Some(offset)) => Ok(Value::Blob { ty, path, offset }),
            (None, _) => Err(mil_err!(Syntax, "BLOBFILE needs a `path`").at(blob_span)),
            (_, None) => Err(mil_err!(Syntax, "BLOBFILE needs an `offset`").at(blob_span)),
        }
    }
}

fn dtype_names() -> String {
    DType::ALL.iter().map(|d| d.mil_name()).collect::<Vec<_>>().join(", ")
}

fn empty_data(dtype: DType) -> Data {
    match dtype {
        DType::Fp16 | DType::Fp32 => Data::Float(Vec::new()),
        DType::Int32 | DType::Uint64 => Data::Int(Vec::new()),
        DType::Bool => Data::Bool(Vec::new()),
        DType::String => Data::Str(Vec::new()),
    }
}

/// Checks a literal's list against its type and appends its elements, row-major. The
/// list may be nested to match the shape (`[[1, 2], [3, 4]]`, as the printer writes
/// it) or flat with one entry per element.
fn fill(tree: &Tree, ty: &TensorType, span: Span, data: &mut Data) -> Result<()> {
    // `ty` is not a scalar, so the numel check of the type parser applies.
    let numel: usize = ty.shape.iter().product();
    match tree {
        Tree::List(items, _) if items.iter().all(|t| matches!(t, Tree::Leaf(_))) => {
            if items.len() != numel {
                return Err(mil_err!(BadLiteral, "a {ty} literal needs {numel} values, found {}", items.len()).at(span));
            }
            for item in items {
                if let Tree::Leaf(t) = item {
                    push_element(data, t, ty.dtype)?;
                }
            }
            Ok(())
        }
        _ => fill_nested(tree, &ty.shape, ty, data),
    }
}

fn fill_nested(tree: &Tree, shape: &[usize], ty: &TensorType, data: &mut Data) -> Result<()> {
    match (tree, shape.first()) {
        (Tree::Leaf(t), None) => push_element(data, t, ty.dtype),
        (Tree::List(items, span), Some(&n)) => {
            if items.len() != n {
                return Err(mil_err!(
                    BadLiteral,
                    "this list of a {ty} literal needs {n} entries, found {}",
                    items.len()
                )
                .at(*span));
            }
            items.iter().try_for_each(|item| fill_nested(item, &shape[1..], ty, data))
        }
        (Tree::Leaf(t), Some(&n)) => {
            Err(mil_err!(BadLiteral, "a {ty} literal needs a list of {n} entries here, found {}", t.tok.describe())
                .at(t.span))
        }
        (Tree::List(_, span), None) => {
            Err(mil_err!(BadLiteral, "a {ty} literal nests deeper than its shape").at(*span))
        }
    }
}

/// Reads one element token as `dtype` and appends it.
fn push_element(data: &mut Data, token: &Token, dtype: DType) -> Result<()> {
    let bad = |what: String| Err(Error::new(ErrorKind::BadLiteral, what).at(token.span));
    let text = match &token.tok {
        Tok::Number(s) | Tok::Ident(s) => s.as_str(),
        Tok::Str(_) if dtype == DType::String => "",
        other => return bad(format!("expected a {dtype} value, found {}", other.describe())),
    };
    match (data, dtype) {
        (Data::Float(v), _) => match parse_float(text) {
            // A finite literal that becomes infinite in its type (`fp16(1e99999)`,
            // `fp16(70000)`) is a mistake; infinity is spelt `inf`.
            Some(x) if (x.is_infinite() && !text.contains("inf")) || overflows(x, dtype) => {
                return bad(format!(
                    "`{text}` is out of range for {dtype} (it would become infinity; write `inf` if meant)"
                ));
            }
            Some(x) => v.push(x),
            None => return bad(format!("`{text}` is not a {dtype} number")),
        },
        (Data::Int(v), DType::Uint64) => match text.parse::<u64>() {
            Ok(x) if !text.starts_with('+') => v.push(x as i64), // the IR keeps the 64 bits
            _ if text.starts_with('-') && text.parse::<i64>().is_ok() => {
                return bad(format!("`{text}` is negative: a uint64 cannot be"));
            }
            _ => return bad(format!("`{text}` is not a uint64 (an integer from 0 to {})", u64::MAX)),
        },
        (Data::Int(v), _) => match text.parse::<i32>() {
            Ok(x) if !text.starts_with('+') => v.push(i64::from(x)),
            _ => {
                return bad(format!("`{text}` is not an int32 (an integer from {} to {})", i32::MIN, i32::MAX));
            }
        },
        (Data::Bool(v), _) => match text {
            "true" => v.push(true),
            "false" => v.push(false),
            _ => return bad(format!("`{text}` is not a bool (`true` or `false`)")),
        },
        (Data::Str(v), _) => match &token.tok {
            Tok::Str(s) => v.push(s.clone()),
            other => return bad(format!("expected a string in quotes, found {}", other.describe())),
        },
    }
    Ok(())
}

/// True when the finite `x` rounds to infinity in `dtype`.
fn overflows(x: f64, dtype: DType) -> bool {
    x.is_finite()
        && match dtype {
            DType::Fp16 => half::f16::from_f64(x).is_infinite(),
            DType::Fp32 => (x as f32).is_infinite(),
            _ => false,
        }
}

/// A float as MIL writes it: decimal (`0.5`, `1e-5`, `2`), hexadecimal (`0x1.8p+1`, as
/// coremltools writes fp16 constants), `inf` or `nan`, with an optional sign.
pub(super) fn parse_float(text: &str) -> Option<f64> {
    let (negative, body) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let magnitude = match body {
        "inf" => f64::INFINITY,
        "nan" => f64::NAN,
        _ if body.starts_with("0x") || body.starts_with("0X") => parse_hex_float(&body[2..])?,
        // Rust's parser is exact; it also takes spellings such as "infinity", which
        // the guard keeps out so that only MIL's own forms are read.
        _ if body.starts_with(|c: char| c.is_ascii_digit() || c == '.')
            && body.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-')) =>
        {
            body.parse::<f64>().ok()?
        }
        _ => return None,
    };
    Some(if negative { -magnitude } else { magnitude })
}

/// `1.8p+1` (after `0x`): hex digits with an optional point, then an optional binary
/// exponent. Mantissas of up to 32 significant hex digits are read exactly before the
/// one rounding to f64, which is more than any fp16 or fp32 constant needs.
fn parse_hex_float(s: &str) -> Option<f64> {
    let (mantissa, exponent) = match s.find(['p', 'P']) {
        Some(i) => (&s[..i], s[i + 1..].parse::<i64>().ok()?),
        None => (s, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return None;
    }
    let mut m: u128 = 0;
    let mut significant = 0;
    for c in int_part.chars().chain(frac_part.chars()) {
        let d = c.to_digit(16)?;
        if m != 0 || d != 0 {
            significant += 1;
        }
        if significant > 32 {
            return None;
        }
        m = m * 16 + u128::from(d);
    }
    let shift = exponent.saturating_sub(4 * frac_part.len() as i64);
    Some(ldexp(m as f64, shift))
}

/// `x · 2^e`, in steps that cannot overflow the intermediate power of two.
fn ldexp(mut x: f64, mut e: i64) -> f64 {
    let step = |e: i64| 2f64.powi(e as i32);
    while e > 1000 && x != 0.0 && x.is_finite() {
        x *= step(1000);
        e -= 1000;
    }
    while e < -1000 && x != 0.0 {
        x *= step(-1000);
        e += 1000;
    }
    if x == 0.0 {
        return x;
    }
    x * step(e.clamp(-1000, 1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_in_every_spelling() {
        assert_eq!(parse_float("2"), Some(2.0));
        assert_eq!(parse_float("-0.5"), Some(-0.5));
        assert_eq!(parse_float("1e-5"), Some(1e-5));
        assert_eq!(parse_float("0x1.8p+1"), Some(3.0));
        assert_eq!(parse_float("0x1p0"), Some(1.0));
        assert_eq!(parse_float("-0x1.5p-17"), Some(-(1.0 + 5.0 / 16.0) / 131072.0));
        assert_eq!(parse_float("0x1p-1074"), Some(f64::from_bits(1)));
        assert_eq!(parse_float("-inf"), Some(f64::NEG_INFINITY));
        assert!(parse_float("nan").unwrap().is_nan());
        assert_eq!(parse_float("-0").map(f64::to_bits), Some((-0.0f64).to_bits()));
        for bad in ["", "-", "1x", "infinity", "0x", "0xg", "1.5.5", "e5", "0x1p"] {
            assert_eq!(parse_float(bad), None, "{bad}");
        }
    }
}
