//! Rank output: prefixing lines for the console, per-rank log files, and the
//! last lines kept in memory for the failure report.
//!
//! One thread per rank stream reads the pipe. Complete lines go to the
//! console as `[rankN]: line`, each written with a single locked write so
//! lines of different ranks never interleave. A partial last line is printed
//! with a newline added when the stream ends. Log files receive the bytes
//! exactly as the rank wrote them, as soon as they are read.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

/// Lines longer than this are split, so a rank that never writes a newline
/// cannot make the launcher buffer without bound.
pub const MAX_LINE: usize = 64 * 1024;

/// Which standard stream of a rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The rank's stdout, shown on the launcher's stdout.
    Stdout,
    /// The rank's stderr, shown on the launcher's stderr.
    Stderr,
}

impl Stream {
    /// `stdout` or `stderr`, as used in log file names.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// The console prefix of a rank: `[rank3]: `.
pub fn prefix(rank: u32) -> String {
    format!("[rank{rank}]: ")
}

/// The last lines (both streams, prefixed) of one rank, for the failure report.
#[derive(Debug)]
pub struct Tail {
    capacity: usize,
    lines: Mutex<VecDeque<Vec<u8>>>,
}

impl Tail {
    /// A tail that keeps at most `capacity` lines.
    pub fn new(capacity: usize) -> Self {
        Tail {
            capacity,
            lines: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
        }
    }

    /// Records one line (prefix included, no trailing newline).
    pub fn push(&self, line: &[u8]) {
        if self.capacity == 0 {
            return;
        }
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.len() == self.capacity {
            lines.pop_front();
        }
        lines.push_back(line.to_vec());
    }

    /// The recorded lines, oldest first.
    pub fn lines(&self) -> Vec<Vec<u8>> {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        lines.iter().cloned().collect()
    }
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds `data`, calling `emit` with every completed line (without its
    /// newline).
    pub fn feed(&mut self, mut data: &[u8], emit: &mut dyn FnMut(&[u8])) {
        while let Some(pos) = data.iter().position(|&b| b == b'\n') {
            if self.pending.is_empty() {
                emit(&data[..pos]);
            } else {
                self.pending.extend_from_slice(&data[..pos]);
                emit(&self.pending);
                self.pending.clear();
            }
            data = &data[pos + 1..];
        }
        self.pending.extend_from_slice(data);
        while self.pending.len() >= MAX_LINE {
            let rest = self.pending.split_off(MAX_LINE);
            emit(&self.pending);
            self.pending = rest;
        }
    }

    /// Emits the unterminated last line, if any.
    pub fn finish(&mut self, emit: &mut dyn FnMut(&[u8])) {
        if !self.pending.is_empty() {
            emit(&self.pending);
            self.pending.clear();
        }
    }
}

/// Where one stream of one rank goes.
pub struct Sink {
    rank: u32,
    stream: Stream,
    prefix: String,
    console: bool,
    file: Option<File>,
    tail: Arc<Tail>,
}

fn write_console(stream: Stream, bytes: &[u8]) {
    // Errors (a closed pipe, a full disk) are ignored: the rank must keep
    // running and its output keeps being drained either way.
    let _ = match stream {
        Stream::Stdout => io::stdout().lock().write_all(bytes),
        Stream::Stderr => io::stderr().lock().write_all(bytes),
    };
}

impl Sink {
    /// Output of `stream` of global rank `rank`: shown on the console if
    /// `console`, copied to `file` if given, and recorded in `tail`.
    pub fn new(
        rank: u32,
        stream: Stream,
        console: bool,
        file: Option<File>,
        tail: Arc<Tail>,
    ) -> Self {
        Sink {
            rank,
            stream,
            prefix: prefix(rank),
            console,
            file,
            tail,
        }
    }

    fn line(&self, line: &[u8], buf: &mut Vec<u8>) {
        buf.clear();
        buf.extend_from_slice(self.prefix.as_bytes());
        buf.extend_from_slice(line);
        self.tail.push(buf);
        if self.console {
            buf.push(b'\n');
            write_console(self.stream, buf);
        }
    }

    /// Copies `reader` to the console, the log file and the tail until EOF.
    /// Returns once the rank (and everything else holding the pipe) has
    /// closed it.
    pub fn pump(mut self, mut reader: impl Read) {
        let mut splitter = LineSplitter::default();
        let mut chunk = vec![0u8; 16 * 1024];
        let mut line_buf = Vec::with_capacity(256);
        loop {
            let n = match reader.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(
                        "reading {} of rank {} failed: {e}",
                        self.stream.name(),
                        self.rank
                    );
                    break;
                }
            };
            if let Some(file) = &mut self.file
                && let Err(e) = file.write_all(&chunk[..n])
            {
                tracing::warn!(
                    "cannot write the {} log of rank {}: {e}; no longer writing it",
                    self.stream.name(),
                    self.rank
                );
                self.file = None;
            }
            splitter.feed(&chunk[..n], &mut |line| self.line(line, &mut line_buf));
        }
        splitter.finish(&mut |line| self.line(line, &mut line_buf));
        if let Some(file) = &mut self.file {
            let _ = file.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut |l| {
                out.push(String::from_utf8_lossy(l).into_owned())
            });
        }
        s.finish(&mut |l| out.push(String::from_utf8_lossy(l).into_owned()));
        out
    }

    #[test]
    fn lines_are_reassembled_across_chunks() {
        assert_eq!(split(&[b"a\nb", b"c\n", b"\nd"]), ["a", "bc", "", "d"]);
        assert_eq!(split(&[b"x\n"]), ["x"]);
        assert!(split(&[]).is_empty());
    }

    #[test]
    fn overlong_lines_are_split() {
        let long = vec![b'z'; MAX_LINE * 2 + 5];
        let lines = split(&[&long, b"\n"]);
        let lens: Vec<usize> = lines.iter().map(String::len).collect();
        assert_eq!(lens, [MAX_LINE, MAX_LINE, 5]);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let t = Tail::new(2);
        for l in [b"1", b"2", b"3"] {
            t.push(l);
        }
        assert_eq!(t.lines(), [b"2".to_vec(), b"3".to_vec()]);
        let none = Tail::new(0);
        none.push(b"x");
        assert!(none.lines().is_empty());
    }

    #[test]
    fn pump_writes_raw_bytes_to_the_file_and_prefixed_lines_to_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout.log");
        let tail = Arc::new(Tail::new(10));
        let sink = Sink::new(
            4,
            Stream::Stdout,
            false,
            Some(File::create(&path).unwrap()),
            Arc::clone(&tail),
        );
        sink.pump(&b"one\ntwo\npartial"[..]);
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\npartial");
        assert_eq!(
            tail.lines(),
            [
                b"[rank4]: one".to_vec(),
                b"[rank4]: two".to_vec(),
                b"[rank4]: partial".to_vec()
            ]
        );
    }
}
