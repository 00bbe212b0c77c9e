//! `train::download` against a small HTTP/1.1 server on 127.0.0.1 run by the test: it
//! serves a tar.gz the test makes, honours `Range`, and can be told to cut the
//! connection after some bytes or to ignore ranges. The transfers are bounded: each
//! server thread answers a fixed number of requests and exits.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use indicatif::ProgressBar;
use sha2::{Digest, Sha256};
use train::download::{self, DownloadError};

/// How the server treats one request.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Honour Range; send everything.
    Normal,
    /// Announce the full length, send only this many bytes of the body, close.
    CutAfter(usize),
    /// Answer 200 with the whole file whatever the Range.
    IgnoreRange,
    /// 404.
    NotFound,
}

/// The `Range` start of every request the server saw (`None`: no Range header).
type RangesSeen = Arc<Mutex<Vec<Option<String>>>>;

/// Starts a server answering one request per behaviour, in order. Returns its URL, the
/// Range headers it saw, and the thread.
fn serve(body: Vec<u8>, behaviours: Vec<Behaviour>) -> (String, RangesSeen, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/TinyStories_all_data.tar.gz", listener.local_addr().unwrap());
    let ranges = Arc::new(Mutex::new(Vec::new()));
    let seen = ranges.clone();
    let handle = std::thread::spawn(move || {
        for behaviour in behaviours {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range = None;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if line.trim().is_empty() {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range = Some(v.trim().trim_end_matches('-').to_string());
                }
            }
            seen.lock().unwrap().push(range.clone());
            let start: usize = match behaviour {
                Behaviour::IgnoreRange => 0,
                _ => range.as_deref().map_or(0, |r| r.parse().unwrap()),
            };
            let head = match behaviour {
                Behaviour::NotFound => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                _ if start > 0 => format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\nConnection: close\r\n\r\n",
                    body.len() - start,
                    body.len() - 1,
                    body.len()
                ),
                _ => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len()),
            };
            stream.write_all(head.as_bytes()).unwrap();
            let rest = &body[start..];
            let sent = match behaviour {
                Behaviour::NotFound => &rest[..0],
                Behaviour::CutAfter(n) => &rest[..n.min(rest.len())],
                _ => rest,
            };
            let _ = stream.write_all(sent);
            let _ = stream.flush();
            // Dropping the stream closes the connection, mid-body for CutAfter.
        }
    });
    (url, ranges, handle)
}

/// A small tar.gz with two JSON shards in it, and its sha256.
fn archive() -> (Vec<u8>, String) {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default()));
    // Incompressible-ish content so the archive is several kilobytes.
    let mut state = 12345u64;
    for name in ["data00.json", "data01.json"] {
        let stories: Vec<String> = (0..300)
            .map(|i| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                format!("{{\"story\": \"Story {i} of {name}: {:x}\"}}", state)
            })
            .collect();
        let content = format!("[{}]", stories.join(","));
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, content.as_bytes()).unwrap();
    }
    let bytes = tar.into_inner().unwrap().finish().unwrap();
    let digest = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
    (bytes, digest)
}

fn quiet() -> ProgressBar {
    ProgressBar::hidden()
}

#[test]
fn an_interrupted_download_resumes_with_range_and_unpacks() {
    let (body, digest) = archive();
    assert!(body.len() > 4_000, "archive is {} bytes", body.len());
    let cut = body.len() / 3;
    let (url, ranges, server) = serve(body.clone(), vec![Behaviour::CutAfter(cut), Behaviour::Normal]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("TinyStories_all_data.tar.gz");

    // First run: the connection drops; a clear error, the partial file kept, no final file.
    let e = download::fetch(&url, &dest, Some(&digest), &quiet()).unwrap_err();
    let message = e.to_string();
    assert!(matches!(e, DownloadError::Interrupted { have, .. } if have == cut as u64), "{message}");
    assert!(message.contains("run the same command again to resume"), "{message}");
    assert!(message.contains(&format!("of {}", body.len())), "{message}");
    let part = download::part_path(&dest);
    assert_eq!(std::fs::metadata(&part).unwrap().len(), cut as u64);
    assert!(!dest.exists(), "an incomplete file must never carry the final name");

    // Second run: asks for the rest and completes.
    let fetched = download::fetch(&url, &dest, Some(&digest), &quiet()).unwrap();
    server.join().unwrap();
    assert_eq!(ranges.lock().unwrap().as_slice(), &[None, Some(cut.to_string())]);
    assert_eq!((fetched.resumed_from, fetched.bytes, fetched.already_complete), (cut as u64, body.len() as u64, false));
    assert_eq!(fetched.sha256, digest);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!part.exists());

    // Third run: nothing to download (no server is listening any more).
    let again = download::fetch(&url, &dest, Some(&digest.to_uppercase()), &quiet()).unwrap();
    assert!(again.already_complete);

    let out = dir.path().join("TinyStories_all_data");
    assert_eq!(download::unpack_tar_gz(&dest, &out, &quiet()).unwrap(), 2);
    let shard = std::fs::read_to_string(out.join("data01.json")).unwrap();
    assert!(shard.starts_with("[{\"story\": \"Story 0 of data01.json"), "{}", &shard[..40]);
    assert!(!Path::new(&format!("{}.partial", out.display())).exists());
    // Unpacking again leaves the folder alone.
    assert_eq!(download::unpack_tar_gz(&dest, &out, &quiet()).unwrap(), 0);
}

#[test]
fn a_wrong_checksum_is_an_error_and_the_file_is_not_kept() {
    let (body, digest) = archive();
    let wrong: String = digest.chars().rev().collect();
    let (url, _, server) = serve(body, vec![Behaviour::Normal]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.tar.gz");
    let e = download::fetch(&url, &dest, Some(&wrong), &quiet()).unwrap_err();
    server.join().unwrap();
    let message = e.to_string();
    assert!(matches!(e, DownloadError::Checksum { .. }), "{message}");
    assert!(message.contains(&digest) && message.contains(&wrong), "{message}");
    assert!(!dest.exists() && !download::part_path(&dest).exists());

    let e = download::fetch(&url, &dest, Some("abc"), &quiet()).unwrap_err();
    assert!(e.to_string().contains("not a sha256 digest"), "{e}");
}

#[test]
fn a_server_that_ignores_range_restarts_the_file() {
    let (body, digest) = archive();
    let (url, ranges, server) = serve(body.clone(), vec![Behaviour::IgnoreRange]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.tar.gz");
    // A stale partial file with wrong bytes.
    std::fs::write(download::part_path(&dest), vec![0xAB; 1000]).unwrap();
    let fetched = download::fetch(&url, &dest, Some(&digest), &quiet()).unwrap();
    server.join().unwrap();
    assert_eq!(ranges.lock().unwrap().as_slice(), &[Some("1000".to_string())]);
    assert_eq!(fetched.resumed_from, 1000);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
}

#[test]
fn http_errors_and_unreachable_servers_are_clear() {
    let (url, _, server) = serve(Vec::new(), vec![Behaviour::NotFound]);
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("a.tar.gz");
    let e = download::fetch(&url, &dest, None, &quiet()).unwrap_err();
    server.join().unwrap();
    assert!(e.to_string().contains("HTTP 404"), "{e}");

    // A port nobody listens on: bind, note the port, close.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = download::fetch(&format!("http://127.0.0.1:{port}/x.tar.gz"), &dest, None, &quiet()).unwrap_err();
    assert!(matches!(e, DownloadError::Interrupted { have: 0, .. }), "{e}");
    assert!(e.to_string().contains("Nothing was written"), "{e}");
    assert!(!dest.exists());
}

#[test]
fn a_corrupt_archive_is_refused_without_a_half_unpacked_folder() {
    let (mut body, _) = archive();
    body.truncate(body.len() / 2);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("cut.tar.gz");
    std::fs::write(&archive, &body).unwrap();
    let out = dir.path().join("out");
    let e = download::unpack_tar_gz(&archive, &out, &quiet()).unwrap_err();
    assert!(e.to_string().contains("cannot unpack"), "{e}");
    assert!(!out.exists());
}
