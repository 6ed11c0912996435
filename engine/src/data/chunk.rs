//! Token-aware chunking with the base model's tokenizer.
//!
//! A document is tokenised once (no special tokens); windows of [`ChunkConfig::size`] tokens advance
//! by `size - overlap`. A trailing window shorter than [`ChunkConfig::min`] is re-aligned to end at
//! the document's end with a full `size` tokens (more overlap, no lost tail, no chunk over `size`).
//! A document shorter than `min` tokens yields no chunk and is counted. Chunk text is the slice of
//! the original text covered by the window's tokens. Ids are `{document_id}_chunk_{i}` as ragd
//! makes them; exact-duplicate chunk texts (after trimming) are dropped, keeping the first.
use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio_util::sync::CancellationToken;

use super::ingest::{Corpus, Document, ExportedChunk};
use super::{Progress, ProgressSender};

/// Chunking errors.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The chunk sizes are inconsistent.
    #[error("invalid chunking settings size={size} overlap={overlap} min={min}: need size > 0, overlap < size and min <= size")]
    InvalidConfig {
        /// Window size in tokens.
        size: usize,
        /// Overlap in tokens.
        overlap: usize,
        /// Minimum chunk size in tokens.
        min: usize,
    },
    /// The tokenizer failed on a document.
    #[error("tokenizer failed on document {document_id}: {message}")]
    Tokenize {
        /// The document.
        document_id: String,
        /// The tokenizer's message.
        message: String,
    },
    /// The tokenizer could not be set up for chunking.
    #[error("tokenizer setup failed: {message}")]
    TokenizerSetup {
        /// What failed.
        message: String,
    },
    /// Training a tokenizer failed.
    #[error("training a WordPiece tokenizer failed: {message}")]
    Train {
        /// The trainer's message.
        message: String,
    },
    /// The run was cancelled.
    #[error("chunking cancelled")]
    Cancelled,
}

/// Chunk sizes in tokens; ragd's defaults are 512 / 50 / 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkConfig {
    /// Tokens per chunk at most.
    pub size: usize,
    /// Tokens shared by consecutive chunks.
    pub overlap: usize,
    /// Fewest tokens a chunk may have.
    pub min: usize,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            size: 512,
            overlap: 50,
            min: 100,
        }
    }
}

impl ChunkConfig {
    /// Checks that size > 0, overlap < size and min <= size.
    pub fn validate(&self) -> Result<(), ChunkError> {
        if self.size == 0 || self.overlap >= self.size || self.min > self.size {
            return Err(ChunkError::InvalidConfig {
                size: self.size,
                overlap: self.overlap,
                min: self.min,
            });
        }
        Ok(())
    }
}

/// One chunk of a document: the unit questions are generated for (the wire type, one on both
/// sides of a job).
pub use ragd_shared::protocol::jobs::Chunk;

/// Counts from chunking.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkSummary {
    /// Chunks kept.
    pub chunks: usize,
    /// Chunks dropped as exact duplicates of an earlier chunk.
    pub duplicates_dropped: usize,
    /// Documents shorter than the minimum chunk size, which gave no chunk.
    pub documents_too_short: usize,
}

/// Splits documents into token windows with a tokenizer.
#[derive(Debug, Clone)]
pub struct Chunker {
    tokenizer: Tokenizer,
    config: ChunkConfig,
}

impl Chunker {
    /// A chunker; fails on inconsistent sizes. The tokenizer's own truncation and padding (a
    /// model's tokenizer.json often truncates at 128 or 512 tokens) are switched off, so whole
    /// documents are tokenised.
    pub fn new(mut tokenizer: Tokenizer, config: ChunkConfig) -> Result<Self, ChunkError> {
        config.validate()?;
        tokenizer
            .with_truncation(None)
            .map_err(|e| ChunkError::TokenizerSetup {
                message: format!("cannot switch truncation off: {e}"),
            })?;
        tokenizer.with_padding(None);
        Ok(Self { tokenizer, config })
    }

    /// The settings in use.
    pub fn config(&self) -> ChunkConfig {
        self.config
    }

    /// The token windows `(start, end)` (end exclusive) for a document of `n` tokens.
    pub fn windows(&self, n: usize) -> Vec<(usize, usize)> {
        let ChunkConfig { size, overlap, min } = self.config;
        let mut out = Vec::new();
        if n == 0 || n < min {
            return out;
        }
        let step = size - overlap;
        let mut start = 0;
        loop {
            let mut end = (start + size).min(n);
            if end - start < min && start > 0 {
                start = n - size.min(n);
                end = n;
            }
            out.push((start, end));
            if end >= n {
                break;
            }
            start += step;
        }
        out
    }

    /// The byte range of every token of `doc`. A long document is tokenised in pieces of about
    /// [`SEGMENT_BYTES`] cut before whitespace (where a BERT tokenizer splits anyway), so memory
    /// stays bounded by the piece rather than the document: a tokenizer's encoding holds about a
    /// hundred bytes per token, an offset sixteen.
    fn token_offsets(&self, doc: &Document) -> Result<Vec<(usize, usize)>, ChunkError> {
        let text = doc.text.as_str();
        let mut offsets = Vec::new();
        let mut start = 0;
        while start < text.len() {
            let mut end = (start + SEGMENT_BYTES).min(text.len());
            if end < text.len() {
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                // Back to the start of the last whitespace run in the piece, if it has one.
                if let Some(ws) = text[start..end].rfind(char::is_whitespace) {
                    let run = text[start..start + ws]
                        .trim_end_matches(char::is_whitespace)
                        .len();
                    if run > 0 {
                        end = start + run;
                    }
                }
            }
            let encoding = self
                .tokenizer
                .encode(&text[start..end], false)
                .map_err(|e| ChunkError::Tokenize {
                    document_id: doc.id.clone(),
                    message: e.to_string(),
                })?;
            offsets.extend(
                encoding
                    .get_offsets()
                    .iter()
                    .map(|&(a, b)| (a + start, b + start)),
            );
            start = end;
        }
        Ok(offsets)
    }

    /// Chunks one document (before de-duplication). Blocking.
    pub fn chunk_document(&self, doc: &Document) -> Result<Vec<Chunk>, ChunkError> {
        let offsets = self.token_offsets(doc)?;
        let mut chunks = Vec::new();
        for (i, (start, end)) in self.windows(offsets.len()).into_iter().enumerate() {
            let from = offsets[start].0;
            let to = offsets[start..end]
                .iter()
                .map(|o| o.1)
                .max()
                .unwrap_or(from);
            let text = doc.text.get(from..to).unwrap_or("").trim();
            if text.is_empty() {
                continue;
            }
            chunks.push(Chunk {
                id: format!("{}_chunk_{i}", doc.id),
                document_id: doc.id.clone(),
                text: text.to_string(),
            });
        }
        Ok(chunks)
    }

    /// Chunks a whole corpus: documents in order, then exported chunks as they are; exact
    /// duplicates dropped. Blocking: call from a blocking thread.
    pub fn chunk_corpus(
        &self,
        corpus: &Corpus,
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<(Vec<Chunk>, ChunkSummary), ChunkError> {
        let mut summary = ChunkSummary::default();
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        let total = corpus.documents.len() as u64;
        for (n, doc) in corpus.documents.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(ChunkError::Cancelled);
            }
            let chunks = self.chunk_document(doc)?;
            if chunks.is_empty() {
                summary.documents_too_short += 1;
            }
            for chunk in chunks {
                push_unique(chunk, &mut seen, &mut out, &mut summary);
            }
            if let Some(tx) = progress {
                let _ = tx.send(Progress::new("chunk", n as u64 + 1, total));
            }
        }
        for exported in &corpus.exported_chunks {
            push_unique(from_export(exported), &mut seen, &mut out, &mut summary);
        }
        summary.chunks = out.len();
        tracing::info!(
            chunks = summary.chunks,
            duplicates = summary.duplicates_dropped,
            too_short = summary.documents_too_short,
            "corpus chunked"
        );
        Ok((out, summary))
    }
}

fn push_unique(
    chunk: Chunk,
    seen: &mut HashSet<blake3::Hash>,
    out: &mut Vec<Chunk>,
    summary: &mut ChunkSummary,
) {
    if seen.insert(blake3::hash(chunk.text.trim().as_bytes())) {
        out.push(chunk);
    } else {
        summary.duplicates_dropped += 1;
    }
}

/// A chunk from a ragd export; its document is `metadata.document_id` when present, else the id
/// without its `_chunk_N` suffix.
pub fn from_export(exported: &ExportedChunk) -> Chunk {
    let document_id = exported
        .metadata
        .get("document_id")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| {
            exported
                .id
                .rsplit_once("_chunk_")
                .filter(|(_, n)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
                .map(|(doc, _)| doc.to_string())
        })
        .unwrap_or_else(|| exported.id.clone());
    Chunk {
        id: exported.id.clone(),
        document_id,
        text: exported.text.trim().to_string(),
    }
}

/// Trains a small BERT-style WordPiece tokenizer on `texts` with the `tokenizers` trainer.
/// Meant for tests and offline experiments where the base model's `tokenizer.json` is absent.
pub fn train_wordpiece(texts: &[String], vocab_size: usize) -> Result<Tokenizer, ChunkError> {
    use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainer};
    use tokenizers::normalizers::BertNormalizer;
    use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
    use tokenizers::{AddedToken, TokenizerImpl};

    let mut trainer = WordPieceTrainer::builder()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(vec![
            AddedToken::from("[PAD]", true),
            AddedToken::from("[UNK]", true),
            AddedToken::from("[CLS]", true),
            AddedToken::from("[SEP]", true),
        ])
        .build();
    let mut tokenizer: TokenizerImpl<
        WordPiece,
        BertNormalizer,
        BertPreTokenizer,
        tokenizers::processors::PostProcessorWrapper,
        tokenizers::decoders::DecoderWrapper,
    > = TokenizerImpl::new(WordPiece::default());
    tokenizer.with_normalizer(Some(BertNormalizer::default()));
    tokenizer.with_pre_tokenizer(Some(BertPreTokenizer));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| ChunkError::Train {
            message: e.to_string(),
        })?;
    let json = serde_json::to_string(&tokenizer).map_err(|e| ChunkError::Train {
        message: e.to_string(),
    })?;
    json.parse::<Tokenizer>().map_err(|e| ChunkError::Train {
        message: e.to_string(),
    })
}

/// Bytes of a document tokenised at once (see [`Chunker::chunk_document`]).
pub const SEGMENT_BYTES: usize = 64 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ingest::SourceFormat;

    fn tokenizer() -> Tokenizer {
        let texts: Vec<String> = [
            "The quick brown fox jumps over the lazy dog.",
            "PostgreSQL stores tables in heap files and indexes in separate files.",
            "A chunk is a window of tokens taken from a document.",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        train_wordpiece(&texts, 300).unwrap()
    }

    fn doc(id: &str, text: &str) -> Document {
        Document {
            id: id.into(),
            text: text.into(),
            format: SourceFormat::Text,
        }
    }

    #[test]
    fn windows_cover_the_tail_without_exceeding_size() {
        let c = Chunker::new(
            tokenizer(),
            ChunkConfig {
                size: 10,
                overlap: 2,
                min: 4,
            },
        )
        .unwrap();
        assert_eq!(c.windows(3), vec![]);
        assert_eq!(c.windows(10), vec![(0, 10)]);
        assert_eq!(c.windows(18), vec![(0, 10), (8, 18)]);
        assert_eq!(c.windows(20), vec![(0, 10), (8, 18), (16, 20)]);
        // A 3-token tail (16..19) is under min: realigned to a full window ending at the end.
        assert_eq!(c.windows(19), vec![(0, 10), (8, 18), (9, 19)]);
        assert!(ChunkConfig {
            size: 10,
            overlap: 10,
            min: 1
        }
        .validate()
        .is_err());
    }

    #[test]
    fn chunks_have_ragd_ids_token_bounds_and_overlap() {
        let tok = tokenizer();
        let config = ChunkConfig {
            size: 20,
            overlap: 5,
            min: 5,
        };
        let c = Chunker::new(tok.clone(), config).unwrap();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(10);
        let chunks = c.chunk_document(&doc("guide/a.md", &text)).unwrap();
        assert!(chunks.len() >= 5, "{}", chunks.len());
        for (i, ch) in chunks.iter().enumerate() {
            assert_eq!(ch.id, format!("guide/a.md_chunk_{i}"));
            let n = tok.encode(ch.text.as_str(), false).unwrap().len();
            assert!((5..=20).contains(&n), "chunk {i} has {n} tokens");
            assert!(text.contains(&ch.text));
        }
        // Consecutive windows overlap: the next chunk starts inside the previous one.
        let first_end = &chunks[0].text[chunks[0].text.len() - 8..];
        assert!(chunks[1].text.contains(first_end.trim()));
    }

    #[test]
    fn duplicates_and_short_documents_are_counted() {
        let c = Chunker::new(
            tokenizer(),
            ChunkConfig {
                size: 50,
                overlap: 5,
                min: 5,
            },
        )
        .unwrap();
        let body = "A chunk is a window of tokens taken from a document.";
        let corpus = Corpus {
            documents: vec![doc("a", body), doc("b", body), doc("c", "tiny")],
            exported_chunks: vec![ExportedChunk {
                id: "exp/doc.md_chunk_3".into(),
                text: "PostgreSQL stores tables in heap files.".into(),
                metadata: serde_json::Value::Null,
            }],
            summary: Default::default(),
        };
        let (chunks, summary) = c
            .chunk_corpus(&corpus, None, &CancellationToken::new())
            .unwrap();
        let ids: Vec<_> = chunks.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["a_chunk_0", "exp/doc.md_chunk_3"]);
        assert_eq!(chunks[1].document_id, "exp/doc.md");
        assert_eq!(summary.duplicates_dropped, 1);
        assert_eq!(summary.documents_too_short, 1);
    }

    #[test]
    fn tokenizer_truncation_is_ignored() {
        let mut tok = tokenizer();
        tok.with_truncation(Some(tokenizers::TruncationParams {
            max_length: 8,
            ..Default::default()
        }))
        .unwrap();
        let c = Chunker::new(
            tok,
            ChunkConfig {
                size: 10,
                overlap: 0,
                min: 1,
            },
        )
        .unwrap();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(5);
        assert!(c.chunk_document(&doc("t", &text)).unwrap().len() >= 4);
    }

    #[test]
    fn a_huge_document_is_chunked() {
        let c = Chunker::new(tokenizer(), ChunkConfig::default()).unwrap();
        let text =
            "PostgreSQL stores tables in heap files and indexes in separate files. ".repeat(20_000);
        let chunks = c.chunk_document(&doc("big.txt", &text)).unwrap();
        assert!(chunks.len() > 500, "{}", chunks.len());
    }

    #[test]
    fn a_document_tokenised_in_pieces_has_the_tokens_of_the_whole() {
        let c = Chunker::new(tokenizer(), ChunkConfig::default()).unwrap();
        let line =
            "PostgreSQL stores tables in heap files.\n\nA chunk   is a window of tokens, ü. ";
        let text = line.repeat(3 * SEGMENT_BYTES / line.len());
        let pieces = c.token_offsets(&doc("big.txt", &text)).unwrap();
        let whole = c.tokenizer.encode(text.as_str(), false).unwrap();
        assert!(text.len() > 2 * SEGMENT_BYTES);
        assert_eq!(pieces, whole.get_offsets());
    }
}
