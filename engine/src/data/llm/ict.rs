//! Inverse Cloze Task pseudo-queries: no LLM at all. One sentence of a chunk becomes the query and
//! the rest of the chunk the positive. Deterministic for a seed: the sentence is drawn with a
//! generator seeded from the run seed and the chunk id.
//!
//! With a [`ReadWindow`], only sentences inside the part of the chunk the encoder reads (its first
//! N tokens) become queries: the positive is truncated to N tokens in training, so a sentence from
//! beyond it would pair a query with a passage that no longer holds its context.
use std::sync::Arc;
use std::time::Instant;

use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio_util::sync::CancellationToken;

use super::generate::{
    chunk_seed, GenerateError, GeneratedQuery, Generation, GeneratorInfo, QueryGenerator,
    QuerySource,
};
use super::BackendInfo;
use crate::data::chunk::Chunk;
use crate::data::{Progress, ProgressSender};

/// ICT settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IctConfig {
    /// Pseudo-queries per chunk (distinct sentences), at most.
    pub queries_per_chunk: usize,
    /// Run seed.
    pub seed: u64,
    /// Shortest sentence, in words, usable as a query.
    pub min_words: usize,
    /// Longest sentence, in words, usable as a query.
    pub max_words: usize,
    /// Probability of leaving the sentence in the positive (the ICT paper keeps it 10% of the time).
    pub keep_sentence_probability: f64,
    /// Longest query, in words: a longer sentence gives a random run of this many of its words
    /// (real questions are shorter than most sentences); the whole sentence still leaves the
    /// positive. 0 keeps whole sentences.
    pub query_words: usize,
}

impl Default for IctConfig {
    fn default() -> Self {
        Self {
            queries_per_chunk: 2,
            seed: 42,
            min_words: 5,
            max_words: 64,
            keep_sentence_probability: 0.0,
            query_words: 0,
        }
    }
}

/// Byte ranges of the sentences of `text`: split after `.`, `!` or `?` followed by whitespace,
/// and at blank lines (paragraph breaks); a single line break inside wrapped prose is not a split.
pub fn sentence_spans(text: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    for (k, &(i, c)) in chars.iter().enumerate() {
        let next_ws = chars.get(k + 1).is_none_or(|&(_, n)| n.is_whitespace());
        let blank_line = c == '\n'
            && chars[k + 1..]
                .iter()
                .take_while(|&&(_, n)| n.is_whitespace())
                .any(|&(_, n)| n == '\n');
        let end = if blank_line {
            Some(i)
        } else if matches!(c, '.' | '!' | '?') && next_ws {
            Some(i + c.len_utf8())
        } else {
            None
        };
        if let Some(end) = end {
            push_span(text, start, end, &mut spans);
            start = end;
        }
    }
    push_span(text, start, text.len(), &mut spans);
    spans
}

fn push_span(text: &str, start: usize, end: usize, spans: &mut Vec<(usize, usize)>) {
    let piece = &text[start..end];
    let lead = piece.len() - piece.trim_start().len();
    let trail = piece.len() - piece.trim_end().len();
    if start + lead < end - trail {
        spans.push((start + lead, end - trail));
    }
}

/// The part of a chunk an encoder reads: its first `tokens` tokens, counted with the model's
/// tokenizer and its two special tokens ([CLS], [SEP]).
#[derive(Clone)]
pub struct ReadWindow {
    tokenizer: Arc<Tokenizer>,
    tokens: usize,
}

impl std::fmt::Debug for ReadWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadWindow")
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl ReadWindow {
    /// The first `tokens` tokens (special tokens included) as `tokenizer` splits the text; the
    /// tokenizer's own truncation and padding are turned off.
    pub fn new(mut tokenizer: Tokenizer, tokens: usize) -> Self {
        let _ = tokenizer.with_truncation(None);
        tokenizer.with_padding(None);
        Self {
            tokenizer: Arc::new(tokenizer),
            tokens,
        }
    }

    /// The byte where the read part of `text` ends (`text.len()` when all of it is read).
    pub fn end_byte(&self, text: &str) -> usize {
        let content = self.tokens.saturating_sub(2);
        if content == 0 {
            return 0;
        }
        // A prefix long enough for `content` tokens in any but the most fragmented text, cut before
        // whitespace (where a BERT tokenizer splits anyway); the whole text when the prefix falls short.
        let mut cut = (content * 32).min(text.len());
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        while cut < text.len() && !text[cut..].starts_with(char::is_whitespace) {
            cut += text[cut..].chars().next().map_or(1, char::len_utf8);
        }
        for piece in [&text[..cut], text] {
            let Ok(enc) = self.tokenizer.encode(piece, false) else {
                return text.len();
            };
            let offsets = enc.get_offsets();
            if offsets.len() > content {
                return offsets[content - 1].1.min(text.len());
            }
            if piece.len() == text.len() {
                break;
            }
        }
        text.len()
    }
}

/// ICT pseudo-queries for one chunk.
pub fn ict_queries(chunk: &Chunk, config: &IctConfig) -> Vec<GeneratedQuery> {
    ict_queries_within(chunk, config, chunk.text.len())
}

/// ICT pseudo-queries for one chunk from the sentences that end by byte `read_end`.
pub fn ict_queries_within(
    chunk: &Chunk,
    config: &IctConfig,
    read_end: usize,
) -> Vec<GeneratedQuery> {
    let spans = sentence_spans(&chunk.text);
    if spans.len() < 2 {
        return Vec::new();
    }
    let usable: Vec<(usize, usize)> = spans
        .iter()
        .copied()
        .filter(|&(s, e)| {
            if e > read_end {
                return false;
            }
            let words = chunk.text[s..e].split_whitespace().count();
            words >= config.min_words && words <= config.max_words
        })
        .collect();
    if usable.is_empty() {
        return Vec::new();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(chunk_seed(config.seed, &chunk.id));
    let n = config.queries_per_chunk.min(usable.len());
    let mut picked: Vec<usize> = sample(&mut rng, usable.len(), n).into_iter().collect();
    picked.sort_unstable();
    picked
        .into_iter()
        .map(|k| {
            let (s, e) = usable[k];
            let keep = rng.random::<f64>() < config.keep_sentence_probability;
            // A kept sentence leaves the positive as the chunk itself (no text of its own).
            let positive = if keep {
                None
            } else {
                let before = chunk.text[..s].trim_end();
                let after = chunk.text[e..].trim_start();
                Some(match (before.is_empty(), after.is_empty()) {
                    (true, _) => after.to_string(),
                    (_, true) => before.to_string(),
                    _ => format!("{before} {after}"),
                })
            };
            let words: Vec<&str> = chunk.text[s..e].split_whitespace().collect();
            let n = config.query_words;
            let run = if n > 0 && words.len() > n {
                let start = rng.random_range(0..=words.len() - n);
                &words[start..start + n]
            } else {
                &words[..]
            };
            GeneratedQuery {
                query: run.join(" "),
                chunk_id: chunk.id.clone(),
                positive_text: positive,
                source: QuerySource::Ict,
            }
        })
        .collect()
}

/// The ICT generator.
#[derive(Debug, Clone, Default)]
pub struct IctGenerator {
    config: IctConfig,
    window: Option<ReadWindow>,
}

impl IctGenerator {
    /// A generator with these settings, drawing from whole chunks.
    pub fn new(config: IctConfig) -> Self {
        Self {
            config,
            window: None,
        }
    }

    /// Draws queries only from the part of each chunk `window` reads.
    pub fn reading(mut self, window: ReadWindow) -> Self {
        self.window = Some(window);
        self
    }
}

#[async_trait::async_trait]
impl QueryGenerator for IctGenerator {
    fn info(&self) -> GeneratorInfo {
        GeneratorInfo {
            backend: BackendInfo {
                kind: "ict".into(),
                model: "none".into(),
                endpoint: None,
            },
            prompt_hash: None,
        }
    }

    async fn check(&self) -> Result<(), GenerateError> {
        Ok(())
    }

    async fn generate(
        &self,
        chunks: &[Chunk],
        progress: Option<&ProgressSender>,
        cancel: &CancellationToken,
    ) -> Result<Generation, GenerateError> {
        let start = Instant::now();
        let mut out = Generation::default();
        out.counts.chunks = chunks.len();
        for (i, chunk) in chunks.iter().enumerate() {
            if cancel.is_cancelled() {
                return Err(GenerateError::Cancelled);
            }
            let read_end = self
                .window
                .as_ref()
                .map_or(chunk.text.len(), |w| w.end_byte(&chunk.text));
            let qs = ict_queries_within(chunk, &self.config, read_end);
            if qs.is_empty() {
                out.counts.chunks_failed += 1;
            } else {
                out.counts.chunks_with_queries += 1;
            }
            out.queries.extend(qs);
            if let Some(tx) = progress {
                let _ = tx.send(Progress::new("generate", i as u64 + 1, chunks.len() as u64));
            }
        }
        out.counts.queries = out.queries.len();
        out.wall_seconds = start.elapsed().as_secs_f64();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(text: &str) -> Chunk {
        Chunk {
            id: "doc_chunk_0".into(),
            document_id: "doc".into(),
            text: text.into(),
        }
    }

    const TEXT: &str = "PostgreSQL stores every table in a heap file. Indexes live in separate files on disk. \
VACUUM reclaims the space of dead row versions!\n\nShort one. Is autovacuum enabled by default\n  in new clusters?";

    #[test]
    fn sentences_split_on_punctuation_and_lines() {
        let spans = sentence_spans(TEXT);
        let s: Vec<&str> = spans.iter().map(|&(a, b)| &TEXT[a..b]).collect();
        assert_eq!(
            s,
            [
                "PostgreSQL stores every table in a heap file.",
                "Indexes live in separate files on disk.",
                "VACUUM reclaims the space of dead row versions!",
                "Short one.",
                "Is autovacuum enabled by default\n  in new clusters?"
            ]
        );
        assert_eq!(sentence_spans("version 1.5 is out."), vec![(0, 19)]);
    }

    #[test]
    fn query_is_removed_from_positive_and_output_is_seeded() {
        let cfg = IctConfig {
            queries_per_chunk: 2,
            ..Default::default()
        };
        let a = ict_queries(&chunk(TEXT), &cfg);
        let b = ict_queries(&chunk(TEXT), &cfg);
        assert_eq!(a, b);
        assert_eq!(a.len(), 2);
        for q in &a {
            let pos = q.positive_text.as_deref().unwrap();
            assert!(!pos.contains(&q.query), "{pos}");
            assert!(q.query.split_whitespace().count() >= 5);
            assert_eq!(q.source, QuerySource::Ict);
        }
        assert_ne!(a[0].query, a[1].query);
        // Different seeds eventually pick different sentences.
        let differs = (1..20).any(|seed| {
            ict_queries(
                &chunk(TEXT),
                &IctConfig {
                    seed,
                    ..cfg.clone()
                },
            ) != a
        });
        assert!(differs);
    }

    #[test]
    fn a_kept_sentence_stays_in_the_whole_chunk_and_passes_the_filters() {
        let cfg = IctConfig {
            queries_per_chunk: 2,
            keep_sentence_probability: 1.0,
            ..Default::default()
        };
        let c = chunk(TEXT);
        let kept = ict_queries(&c, &cfg);
        assert_eq!(kept.len(), 2);
        for q in &kept {
            assert_eq!(q.positive_text, None, "the positive is the chunk itself");
            assert!(crate::data::filter::positive_text(q, &c).contains(&q.query));
        }
        let map = [(c.id.as_str(), &c)].into_iter().collect();
        // Runs of 5 words count as copies here (10 by default; these sentences are shorter).
        let config = crate::data::filter::FilterConfig {
            copy_span_words: 5,
            ..Default::default()
        };
        let (passed, counts) =
            crate::data::filter::text_filters(kept.clone(), &map, &config).unwrap();
        assert_eq!(passed, kept, "{counts:?}");
        // The same sentences with the whole chunk written out as their positive are copies.
        let written: Vec<_> = kept
            .into_iter()
            .map(|q| GeneratedQuery {
                positive_text: Some(TEXT.into()),
                ..q
            })
            .collect();
        let (passed, _) = crate::data::filter::text_filters(written, &map, &config).unwrap();
        assert!(passed.is_empty());
    }

    #[test]
    fn long_sentences_give_a_run_of_their_words_and_still_leave_the_positive() {
        let whole = IctConfig {
            queries_per_chunk: 3,
            ..Default::default()
        };
        let short = IctConfig {
            query_words: 4,
            ..whole.clone()
        };
        let c = chunk(TEXT);
        let (a, b) = (ict_queries(&c, &whole), ict_queries(&c, &short));
        assert_eq!(a.len(), b.len());
        for (w, q) in a.iter().zip(&b) {
            // The same sentence, cut to a run of 4 of its words, removed whole from the positive.
            assert_eq!(q.query.split_whitespace().count(), 4, "{}", q.query);
            assert!(w.query.contains(&q.query), "{} / {}", w.query, q.query);
            assert_eq!(w.positive_text, q.positive_text);
        }
        assert_eq!(b, ict_queries(&c, &short), "seeded");
        // Sentences already within the limit stay whole.
        let roomy = IctConfig {
            query_words: 64,
            ..whole.clone()
        };
        assert_eq!(ict_queries(&c, &roomy), a);
    }

    #[test]
    fn single_sentence_chunks_give_nothing() {
        assert!(ict_queries(
            &chunk("Only one sentence here at all."),
            &IctConfig::default()
        )
        .is_empty());
    }

    #[test]
    fn a_read_window_keeps_queries_inside_what_the_encoder_reads() {
        let texts = vec![TEXT.to_string()];
        let tokenizer = crate::data::chunk::train_wordpiece(&texts, 300).unwrap();
        let whole = ReadWindow::new(tokenizer.clone(), 4096);
        assert_eq!(whole.end_byte(TEXT), TEXT.len());
        // The prefix it tokenises first may fall inside a multi-byte character.
        let curly = "system\u{2019}s ".repeat(40);
        assert_eq!(ReadWindow::new(tokenizer.clone(), 2).end_byte(&curly), 0);
        for tokens in [3, 4, 5, 9] {
            let end = ReadWindow::new(tokenizer.clone(), tokens).end_byte(&curly);
            assert!(
                curly.is_char_boundary(end) && end < curly.len(),
                "{tokens}: {end}"
            );
        }
        // Exactly the tokens of the first two sentences, plus [CLS] and [SEP].
        let two = TEXT[..TEXT.find("VACUUM").unwrap()].trim_end();
        let n = tokenizer.encode(two, false).unwrap().get_ids().len();
        let window = ReadWindow::new(tokenizer, n + 2);
        let end = window.end_byte(TEXT);
        assert_eq!(&TEXT[..end], two);
        let cfg = IctConfig {
            queries_per_chunk: 5,
            ..Default::default()
        };
        assert_eq!(ict_queries(&chunk(TEXT), &cfg).len(), 4);
        let inside: Vec<String> = ict_queries_within(&chunk(TEXT), &cfg, end)
            .into_iter()
            .map(|q| q.query)
            .collect();
        assert_eq!(
            inside,
            [
                "PostgreSQL stores every table in a heap file.",
                "Indexes live in separate files on disk."
            ]
        );
    }
}
