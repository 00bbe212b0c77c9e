//! Reading telemetry lines: parsing one line leniently, and tailing a file that another
//! process is still appending to.
//!
//! A telemetry file is written by processes that can die at any byte: a crash leaves a
//! truncated last line, and the resumed process then appends its first line right after
//! it, on the same line. So a line that does not parse is counted, never fatal, and when
//! a later `{"event"` starts inside it the parser resynchronises there.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use train::telemetry::Event;

/// What one line of telemetry turned out to be.
#[derive(Clone, Debug, PartialEq)]
pub enum Parsed {
    Event(Box<Event>),
    /// A JSON object with an `"event"` this reader does not know (a newer writer).
    Unknown(String),
    /// Not a telemetry event; the reason is serde_json's message (with its column).
    Malformed(String),
}

/// Where every object of a telemetry line starts: `{"event"` as the writer prints it.
const EVENT_START: &str = "{\"event\"";

/// Parses one line (without its newline). Blank lines give nothing; a line holding a
/// truncated object followed by a complete one gives a `Malformed` and then the event.
pub fn parse_line(line: &str) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        match parse_object(rest) {
            Ok(parsed) => {
                out.push(parsed);
                break;
            }
            Err(reason) => {
                // Resynchronise at the next object start, if any: the bytes before it are
                // the remains of a line cut short.
                let skip = rest.chars().next().map_or(1, char::len_utf8);
                match rest[skip..].find(EVENT_START) {
                    Some(at) => {
                        out.push(Parsed::Malformed(format!("{reason} (truncated line, resynchronised)")));
                        rest = &rest[skip + at..];
                    }
                    None => {
                        out.push(Parsed::Malformed(reason));
                        break;
                    }
                }
            }
        }
    }
    out
}

fn parse_object(text: &str) -> Result<Parsed, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let name = match value.get("event") {
        Some(serde_json::Value::String(name)) => name.clone(),
        Some(_) => return Err("`event` is not a string".into()),
        None if value.is_object() => return Err("no `event` field".into()),
        None => return Err("not a JSON object".into()),
    };
    match serde_json::from_value::<Event>(value) {
        Ok(event) => Ok(Parsed::Event(Box::new(event))),
        // serde's message for a tag it does not know starts with "unknown variant".
        Err(e) if e.to_string().starts_with("unknown variant") => Ok(Parsed::Unknown(name)),
        Err(e) => Err(format!("`{name}` event: {e}")),
    }
}

/// Follows a file as `tail -f` does: each [`Tail::poll`] returns the complete lines
/// appended since the last one. An incomplete last line is held back until its newline
/// arrives (the writer may be mid-line), or until [`Tail::finish`] says no more is coming.
pub struct Tail {
    path: PathBuf,
    file: Option<File>,
    /// Bytes of the file consumed so far.
    offset: u64,
    /// The start of a line whose newline has not arrived yet.
    partial: Vec<u8>,
    /// Lines returned so far (the next line's number is this + 1).
    lines: usize,
}

/// What one poll of a [`Tail`] found.
#[derive(Debug, Default, PartialEq)]
pub struct Poll {
    /// `(1-based line number, text)` of each complete new line.
    pub lines: Vec<(usize, String)>,
    /// The file shrank (it was truncated or replaced): everything read before is void and
    /// these lines start again from line 1.
    pub restarted: bool,
}

impl Tail {
    /// A tail of `path`, which need not exist yet (a child process creates it later).
    pub fn new(path: impl Into<PathBuf>) -> Tail {
        Tail { path: path.into(), file: None, offset: 0, partial: Vec::new(), lines: 0 }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of an incomplete last line held back.
    pub fn pending_bytes(&self) -> usize {
        self.partial.len()
    }

    /// Reads what was appended since the last poll. A file that does not exist (yet)
    /// gives no lines; other I/O errors are returned.
    pub fn poll(&mut self) -> io::Result<Poll> {
        let mut poll = Poll::default();
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(poll),
                Err(e) => return Err(e),
            }
        }
        let file = self.file.as_mut().expect("opened above");
        let len = file.metadata()?.len();
        if len < self.offset {
            self.offset = 0;
            self.partial.clear();
            self.lines = 0;
            poll.restarted = true;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.take(len - self.offset).read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        if let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') {
            let rest = self.partial.split_off(last_newline + 1);
            let complete = std::mem::replace(&mut self.partial, rest);
            for line in complete[..complete.len() - 1].split(|&b| b == b'\n') {
                self.lines += 1;
                poll.lines.push((self.lines, String::from_utf8_lossy(line).into_owned()));
            }
        }
        Ok(poll)
    }

    /// The writer is gone: the held-back incomplete line, if any, is the last line.
    pub fn finish(&mut self) -> Option<(usize, String)> {
        if self.partial.is_empty() {
            return None;
        }
        self.lines += 1;
        let line = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
        Some((self.lines, line))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const STEP: &str = r#"{"event":"step","step":3,"loss":2.5,"lr":0.001,"grad_norm":0.7,"tokens_per_s":1000.0,"gflops":2.0,"ms":50.0,"phases_ms":{"device_forward":1.0,"device_backward":2.0,"surface_io":3.0,"rmsnorm":4.0,"classifier_loss":5.0,"dw":6.0,"optimizer":7.0,"other":8.0}}"#;

    fn malformed(p: &Parsed) -> &str {
        match p {
            Parsed::Malformed(reason) => reason,
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    #[test]
    fn a_step_line_parses_to_its_fields() {
        let parsed = parse_line(STEP);
        assert_eq!(parsed.len(), 1);
        let Parsed::Event(event) = &parsed[0] else { panic!("{parsed:?}") };
        let Event::Step { step, loss, phases_ms, compile_stall_ms, .. } = event.as_ref() else { panic!("{event:?}") };
        assert_eq!((*step, *loss, phases_ms.dw, *compile_stall_ms), (3, 2.5, 6.0, None));
    }

    #[test]
    fn malformed_lines_are_reported_with_a_reason() {
        assert!(parse_line("").is_empty());
        assert!(parse_line("   ").is_empty());
        assert!(malformed(&parse_line("not json")[0]).contains("expected"));
        assert_eq!(malformed(&parse_line("[1, 2]")[0]), "not a JSON object");
        // Multi-byte characters before a resynchronisation point are skipped whole.
        assert_eq!(parse_line("é{\"event\":\"eval\",\"step\":1,\"val_loss\":2.0}").len(), 2);
        assert_eq!(malformed(&parse_line(r#"{"step": 3}"#)[0]), "no `event` field");
        assert_eq!(malformed(&parse_line(r#"{"event": 7}"#)[0]), "`event` is not a string");
        // A known event with a field of the wrong type names the event and the field.
        let wrong = STEP.replace(r#""loss":2.5"#, r#""loss":"low""#);
        let reason = malformed(&parse_line(&wrong)[0]).to_string();
        assert!(reason.starts_with("`step` event:") && reason.contains("invalid type"), "{reason}");
        // A missing field too.
        let missing = STEP.replace(r#""loss":2.5,"#, "");
        assert!(malformed(&parse_line(&missing)[0]).contains("missing field `loss`"));
        // Cut anywhere, the line is malformed — never a panic.
        for cut in 1..STEP.len() {
            let parsed = parse_line(&STEP[..cut]);
            assert!(parsed.iter().all(|p| matches!(p, Parsed::Malformed(_))), "cut at {cut}: {parsed:?}");
        }
    }

    #[test]
    fn an_unknown_event_is_not_malformed() {
        assert_eq!(parse_line(r#"{"event":"thermal","celsius":80}"#), vec![Parsed::Unknown("thermal".into())]);
    }

    #[test]
    fn a_truncated_line_followed_by_a_new_process_resynchronises() {
        // What a crash mid-write plus `--resume` leave behind: no newline after the cut.
        let line = format!("{}{}", &STEP[..60], r#"{"event":"eval","step":20,"val_loss":3.5}"#);
        let parsed = parse_line(&line);
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert!(malformed(&parsed[0]).contains("resynchronised"));
        assert_eq!(parsed[1], Parsed::Event(Box::new(Event::Eval { step: 20, val_loss: 3.5 })));
    }

    #[test]
    fn a_tail_returns_complete_lines_and_holds_back_a_partial_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let mut tail = Tail::new(&path);
        assert_eq!(tail.poll().unwrap(), Poll::default(), "no file yet");

        let mut f = File::create(&path).unwrap();
        write!(f, "a\nb\nhalf").unwrap();
        let poll = tail.poll().unwrap();
        assert_eq!(poll.lines, vec![(1, "a".to_string()), (2, "b".to_string())]);
        assert_eq!(tail.pending_bytes(), 4);
        assert!(tail.poll().unwrap().lines.is_empty(), "nothing new");

        write!(f, " done\nc").unwrap();
        assert_eq!(tail.poll().unwrap().lines, vec![(3, "half done".to_string())]);
        assert_eq!(tail.finish(), Some((4, "c".to_string())));
        assert_eq!(tail.finish(), None);
    }

    #[test]
    fn a_tail_starts_over_when_the_file_is_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, "one\ntwo\n").unwrap();
        let mut tail = Tail::new(&path);
        assert_eq!(tail.poll().unwrap().lines.len(), 2);
        std::fs::write(&path, "new\n").unwrap();
        let poll = tail.poll().unwrap();
        assert!(poll.restarted);
        assert_eq!(poll.lines, vec![(1, "new".to_string())]);
    }

    #[test]
    fn invalid_utf8_is_a_malformed_line_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        std::fs::write(&path, b"\xff\xfe{\n").unwrap();
        let mut tail = Tail::new(&path);
        let lines = tail.poll().unwrap().lines;
        assert_eq!(lines.len(), 1);
        assert!(matches!(parse_line(&lines[0].1)[0], Parsed::Malformed(_)));
    }
}
