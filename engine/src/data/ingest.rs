//! Corpus ingestion: a directory (walked recursively) of `.md`, `.txt`, `.rst` and `.html` files,
//! and ragd chunk exports (`.jsonl` files whose lines are `{"id","text","metadata"}`).
//!
//! Bad files never abort a run: binary files, invalid UTF-8, empty, oversized and unreadable files
//! are skipped with a `tracing` warning and counted in [`IngestSummary`]. Only a missing corpus is
//! an error. Files are visited in sorted path order, so the output is deterministic.
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Progress, ProgressSender};

/// Errors that abort ingestion (everything else is skipped and counted).
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The corpus path does not exist.
    #[error("corpus {path} does not exist: pass --corpus a directory of .md/.txt/.rst/.html files or ragd chunk-export .jsonl files")]
    CorpusMissing {
        /// The path given.
        path: PathBuf,
    },
    /// The corpus directory itself could not be listed.
    #[error("cannot list corpus directory {path}: {source}")]
    ListCorpus {
        /// The corpus directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The run was cancelled.
    #[error("ingestion cancelled")]
    Cancelled,
}

/// Why a file or line was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The file holds NUL bytes (binary).
    Binary,
    /// The file is not valid UTF-8.
    InvalidUtf8,
    /// The file (or its text once markup is stripped) is empty.
    Empty,
    /// The file is larger than [`IngestOptions::max_file_bytes`].
    TooLarge,
    /// The file or a directory could not be read.
    Unreadable,
    /// A line of a chunk export is not a JSON object with string `id` and `text`.
    BadJsonLine,
}

/// What kind of text a source file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    /// Markdown.
    Markdown,
    /// Plain text.
    Text,
    /// reStructuredText.
    Rst,
    /// HTML (tags stripped).
    Html,
}

impl SourceFormat {
    /// The format a file extension denotes, if ingested.
    pub fn from_extension(ext: &str) -> Option<Self> {
        match ext.to_ascii_lowercase().as_str() {
            "md" | "markdown" => Some(Self::Markdown),
            "txt" => Some(Self::Text),
            "rst" => Some(Self::Rst),
            "html" | "htm" => Some(Self::Html),
            _ => None,
        }
    }
}

/// One ingested document, to be chunked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Document {
    /// Stable id: the path relative to the corpus root, with `/` separators.
    pub id: String,
    /// The text (markup stripped for HTML).
    pub text: String,
    /// The source format.
    pub format: SourceFormat,
}

/// A chunk taken as is from a ragd chunk export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportedChunk {
    /// The chunk id from the export.
    pub id: String,
    /// The chunk text.
    pub text: String,
    /// The export's metadata (`null` when absent).
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// Ingestion options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestOptions {
    /// Files larger than this are skipped as [`SkipReason::TooLarge`].
    pub max_file_bytes: u64,
}

impl Default for IngestOptions {
    fn default() -> Self {
        Self {
            max_file_bytes: 64 * 1024 * 1024,
        }
    }
}

/// Counts of what ingestion saw and skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestSummary {
    /// Files with an ingested extension that were examined.
    pub files_seen: usize,
    /// Files with other extensions, ignored silently.
    pub files_ignored: usize,
    /// Documents produced.
    pub documents: usize,
    /// Chunks read from chunk exports.
    pub exported_chunks: usize,
    /// Skips per reason (files, or lines for [`SkipReason::BadJsonLine`]).
    pub skipped: BTreeMap<SkipReason, usize>,
    /// The skipped paths (with `:LINE` for bad export lines) and why.
    pub skipped_files: Vec<(String, SkipReason)>,
}

impl IngestSummary {
    fn skip(&mut self, what: String, reason: SkipReason) {
        tracing::warn!(file = %what, ?reason, "skipping corpus file");
        *self.skipped.entry(reason).or_default() += 1;
        self.skipped_files.push((what, reason));
    }

    /// Total files and lines skipped.
    pub fn total_skipped(&self) -> usize {
        self.skipped.values().sum()
    }
}

/// The result of ingesting a corpus.
#[derive(Debug, Clone, Default)]
pub struct Corpus {
    /// Documents to chunk, in path order.
    pub documents: Vec<Document>,
    /// Ready-made chunks from ragd chunk exports, in file and line order.
    pub exported_chunks: Vec<ExportedChunk>,
    /// What was seen and skipped.
    pub summary: IngestSummary,
}

/// Ingests `root` (a directory, or a single file). Blocking: call from a blocking thread.
pub fn ingest(
    root: &Path,
    options: &IngestOptions,
    progress: Option<&ProgressSender>,
    cancel: &CancellationToken,
) -> Result<Corpus, IngestError> {
    if !root.exists() {
        return Err(IngestError::CorpusMissing {
            path: root.to_path_buf(),
        });
    }
    let mut files = Vec::new();
    let mut summary = IngestSummary::default();
    if root.is_file() {
        files.push(root.to_path_buf());
    } else {
        fs::read_dir(root).map_err(|source| IngestError::ListCorpus {
            path: root.to_path_buf(),
            source,
        })?;
        walk(root, &mut files, &mut summary);
    }
    files.sort();
    let base = if root.is_file() {
        root.parent().unwrap_or(Path::new("")).to_path_buf()
    } else {
        root.to_path_buf()
    };
    let mut corpus = Corpus::default();
    let total = files.len() as u64;
    for (i, path) in files.iter().enumerate() {
        if cancel.is_cancelled() {
            return Err(IngestError::Cancelled);
        }
        let rel = relative_id(&base, path);
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        if ext == "jsonl" {
            summary.files_seen += 1;
            if let Some(text) = read_text(path, &rel, options, &mut summary) {
                read_export(&text, &rel, &mut corpus.exported_chunks, &mut summary);
            }
        } else if let Some(format) = SourceFormat::from_extension(&ext) {
            summary.files_seen += 1;
            if let Some(raw) = read_text(path, &rel, options, &mut summary) {
                let text = match format {
                    SourceFormat::Html => strip_html(&raw),
                    _ => raw,
                };
                if text.trim().is_empty() {
                    summary.skip(rel, SkipReason::Empty);
                } else {
                    corpus.documents.push(Document {
                        id: rel,
                        text,
                        format,
                    });
                }
            }
        } else {
            summary.files_ignored += 1;
        }
        if let Some(tx) = progress {
            // A closed progress channel only means nobody is watching.
            let _ = tx.send(Progress::new("ingest", i as u64 + 1, total));
        }
    }
    summary.documents = corpus.documents.len();
    summary.exported_chunks = corpus.exported_chunks.len();
    tracing::info!(
        documents = summary.documents,
        exported_chunks = summary.exported_chunks,
        skipped = summary.total_skipped(),
        "corpus ingested"
    );
    corpus.summary = summary;
    Ok(corpus)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>, summary: &mut IngestSummary) {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(_) => {
            summary.skip(dir.display().to_string(), SkipReason::Unreadable);
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // `metadata` follows symlinks; a dangling link is reported as unreadable.
        match fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, files, summary),
            Ok(_) => files.push(path),
            Err(_) => files.push(path),
        }
    }
}

fn relative_id(base: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(base).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("/")
}

fn read_text(
    path: &Path,
    rel: &str,
    options: &IngestOptions,
    summary: &mut IngestSummary,
) -> Option<String> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(_) => {
            summary.skip(rel.to_string(), SkipReason::Unreadable);
            return None;
        }
    };
    if meta.len() > options.max_file_bytes {
        summary.skip(rel.to_string(), SkipReason::TooLarge);
        return None;
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    let read = fs::File::open(path).and_then(|f| {
        f.take(options.max_file_bytes + 1)
            .read_to_end(&mut bytes)
            .map(|_| ())
    });
    if read.is_err() {
        summary.skip(rel.to_string(), SkipReason::Unreadable);
        return None;
    }
    if bytes.len() as u64 > options.max_file_bytes {
        summary.skip(rel.to_string(), SkipReason::TooLarge);
        return None;
    }
    if bytes.iter().take(8192).any(|&b| b == 0) {
        summary.skip(rel.to_string(), SkipReason::Binary);
        return None;
    }
    match String::from_utf8(bytes) {
        Ok(text) if text.trim().is_empty() => {
            summary.skip(rel.to_string(), SkipReason::Empty);
            None
        }
        Ok(text) => Some(text.strip_prefix('\u{feff}').unwrap_or(&text).to_string()),
        Err(_) => {
            summary.skip(rel.to_string(), SkipReason::InvalidUtf8);
            None
        }
    }
}

fn read_export(text: &str, rel: &str, out: &mut Vec<ExportedChunk>, summary: &mut IngestSummary) {
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<ExportedChunk>(line) {
            Ok(chunk) if !chunk.text.trim().is_empty() && !chunk.id.is_empty() => out.push(chunk),
            _ => summary.skip(format!("{rel}:{}", n + 1), SkipReason::BadJsonLine),
        }
    }
}

/// Strips HTML markup: drops tags, comments and the content of `script`, `style`, `head`-level
/// `title` is kept as text; decodes common entities; block elements become line breaks.
pub fn strip_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len() / 2);
    let lower = html.to_ascii_lowercase();
    let bytes = html.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'<' {
            if lower[i..].starts_with("<!--") {
                i = lower[i..].find("-->").map_or(bytes.len(), |p| i + p + 3);
                continue;
            }
            let (tag, end) = match lower[i..].find('>') {
                Some(p) => (&lower[i + 1..i + p], i + p + 1),
                None => (&lower[i + 1..], bytes.len()),
            };
            let name: String = tag
                .trim_start_matches('/')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            let opening = !tag.starts_with('/') && !tag.ends_with('/');
            if opening
                && (matches!(name.as_str(), "nav" | "header" | "footer")
                    || (name == "div" && class_mentions_nav(tag)))
            {
                // Navigation bars repeat on every page: they are not content.
                i = skip_element(&lower, end, &name);
                continue;
            }
            if !tag.starts_with('/') && (name == "script" || name == "style") {
                let close = format!("</{name}");
                i = lower[end..]
                    .find(&close)
                    .map_or(bytes.len(), |p| end + p)
                    .max(end);
                continue;
            }
            if matches!(
                name.as_str(),
                "p" | "br"
                    | "div"
                    | "li"
                    | "tr"
                    | "h1"
                    | "h2"
                    | "h3"
                    | "h4"
                    | "h5"
                    | "h6"
                    | "pre"
                    | "table"
                    | "dt"
                    | "dd"
                    | "title"
                    | "section"
            ) {
                out.push('\n');
            }
            i = end;
        } else {
            let next = lower[i..].find('<').map_or(bytes.len(), |p| i + p);
            out.push_str(&decode_entities(&html[i..next]));
            i = next;
        }
    }
    collapse_blank_lines(&out)
}

/// Whether a tag's `class` attribute names navigation (`navheader`, `navbar`, ...).
fn class_mentions_nav(tag: &str) -> bool {
    let Some(p) = tag.find("class=") else {
        return false;
    };
    let rest = &tag[p + 6..];
    let value = match rest.chars().next() {
        Some(q @ ('"' | '\'')) => rest[1..].split(q).next().unwrap_or(""),
        _ => rest.split_whitespace().next().unwrap_or(""),
    };
    value.split_whitespace().any(|c| c.starts_with("nav"))
}

/// The position after the element `name` that starts before `from`, nested ones included.
fn skip_element(lower: &str, from: usize, name: &str) -> usize {
    let open = format!("<{name}");
    let close = format!("</{name}");
    let mut depth = 1;
    let mut pos = from;
    while depth > 0 {
        let next_open = lower[pos..].find(&open).map(|p| pos + p);
        let next_close = lower[pos..].find(&close).map(|p| pos + p);
        match (next_open, next_close) {
            (Some(o), Some(c)) if o < c => {
                let after = lower[o + open.len()..].chars().next();
                if after.is_some_and(|ch| !ch.is_ascii_alphanumeric()) {
                    depth += 1;
                }
                pos = o + open.len();
            }
            (_, Some(c)) => {
                depth -= 1;
                pos = c + close.len();
            }
            _ => return lower.len(),
        }
    }
    lower[pos..].find('>').map_or(lower.len(), |p| pos + p + 1)
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(p) = rest.find('&') {
        out.push_str(&rest[..p]);
        rest = &rest[p..];
        let end = rest.find(';').filter(|&e| e <= 10);
        let decoded = end.and_then(|e| {
            let name = &rest[1..e];
            let c = match name {
                "amp" => Some('&'),
                "lt" => Some('<'),
                "gt" => Some('>'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                "nbsp" => Some(' '),
                _ if name.starts_with("#x") || name.starts_with("#X") => {
                    u32::from_str_radix(&name[2..], 16)
                        .ok()
                        .and_then(char::from_u32)
                }
                _ if name.starts_with('#') => name[1..].parse().ok().and_then(char::from_u32),
                _ => None,
            };
            c.map(|c| (c, e + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn collapse_blank_lines(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut blank = 0;
    for line in s.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) {
        let path = dir.join(name);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, bytes).unwrap();
    }

    #[test]
    fn bad_files_are_skipped_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        write(d, "a.md", b"# Title\n\nSome markdown text.");
        write(d, "sub/b.txt", b"Plain text file.");
        write(d, "sub/deeper/c.html", b"<html><head><style>x{}</style></head><body><p>Hello &amp; welcome</p><script>var a=1;</script></body></html>");
        write(d, "bin.txt", b"abc\0\x01\x02def");
        write(d, "empty.md", b"");
        write(d, "blank.rst", b"   \n\n  ");
        write(d, "latin1.txt", b"caf\xe9 au lait");
        write(d, "huge.txt", &vec![b'a'; 4096]);
        write(d, "tagsonly.html", b"<html><body><br/></body></html>");
        write(d, "image.png", b"\x89PNG");
        write(
            d,
            "export.jsonl",
            b"{\"id\":\"doc_chunk_0\",\"text\":\"from export\",\"metadata\":{\"k\":1}}\nnot json\n{\"id\":\"x\"}\n",
        );
        #[cfg(unix)]
        std::os::unix::fs::symlink(d.join("missing-target"), d.join("dangling.md")).unwrap();

        let opts = IngestOptions {
            max_file_bytes: 1024,
        };
        let corpus = ingest(d, &opts, None, &CancellationToken::new()).unwrap();
        let ids: Vec<_> = corpus.documents.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["a.md", "sub/b.txt", "sub/deeper/c.html"]);
        assert_eq!(corpus.documents[2].text, "Hello & welcome");
        let s = &corpus.summary;
        assert_eq!(s.skipped.get(&SkipReason::Binary), Some(&1));
        assert_eq!(s.skipped.get(&SkipReason::Empty), Some(&3));
        assert_eq!(s.skipped.get(&SkipReason::InvalidUtf8), Some(&1));
        assert_eq!(s.skipped.get(&SkipReason::TooLarge), Some(&1));
        assert_eq!(s.skipped.get(&SkipReason::BadJsonLine), Some(&2));
        #[cfg(unix)]
        assert_eq!(s.skipped.get(&SkipReason::Unreadable), Some(&1));
        assert_eq!(s.files_ignored, 1);
        assert_eq!(corpus.exported_chunks.len(), 1);
        assert_eq!(corpus.exported_chunks[0].metadata["k"], 1);
    }

    #[test]
    fn missing_corpus_is_an_error_naming_the_path() {
        let err = ingest(
            Path::new("/nonexistent/corpus"),
            &IngestOptions::default(),
            None,
            &CancellationToken::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/corpus"), "{err}");
    }

    #[test]
    fn cancellation_stops_ingestion() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "a.md", b"text");
        let cancel = CancellationToken::new();
        cancel.cancel();
        let err = ingest(tmp.path(), &IngestOptions::default(), None, &cancel).unwrap_err();
        assert!(matches!(err, IngestError::Cancelled));
    }

    #[test]
    fn html_entities_and_blocks() {
        let nav = strip_html(
            "<div class=\"navheader\"><div>Prev</div><div>Next</div></div><p>Body</p><nav>menu</nav><div class=\"sect1\">Kept</div>",
        );
        assert_eq!(nav, "Body\n\nKept");
        let text = strip_html("<h1>T&#105;tle</h1><!-- c --><p>a &lt;b&gt; &#x41; &bogus; x</p>");
        assert_eq!(text, "Title\n\na <b> A &bogus; x");
    }
}
