//! Human-readable capability report for `ragd-worker info`.

use std::fmt::Write as _;

use super::{Backend, Capabilities, LlmApi};

const GIB: f64 = (1u64 << 30) as f64;

/// A multi-line, human-readable report of `c`, ending with a newline.
pub fn render_text(c: &Capabilities) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, c);
    out
}

fn write_report(out: &mut String, c: &Capabilities) -> std::fmt::Result {
    writeln!(out, "OS:        {}", c.os)?;
    writeln!(out, "Arch:      {}", c.arch)?;
    writeln!(out, "Host:      {}", c.hostname)?;
    writeln!(out, "CPU:       {}", c.cpu_model)?;
    writeln!(out, "Cores:     {} logical", c.logical_cores)?;
    writeln!(
        out,
        "RAM:       {} total, {} available",
        gib(c.total_memory_bytes),
        gib(c.available_memory_bytes)
    )?;
    if c.gpus.is_empty() {
        writeln!(out, "GPUs:      none")?;
    } else {
        writeln!(out, "GPUs:")?;
        for g in &c.gpus {
            let cc = g
                .compute_capability
                .map(|(major, minor)| format!(", compute capability {major}.{minor}"))
                .unwrap_or_default();
            writeln!(
                out,
                "  [{} {}] {}, {} memory{cc}",
                backend_name(g.backend),
                g.index,
                g.name,
                gib(g.memory_bytes)
            )?;
        }
    }
    let backends: Vec<&str> = c.backends.iter().map(|b| backend_name(*b)).collect();
    writeln!(out, "Backends:  {}", backends.join(", "))?;
    if c.llm_endpoints.is_empty() {
        writeln!(
            out,
            "LLMs:      none found (is Ollama running? start it with `ollama serve`)"
        )?;
    } else {
        writeln!(out, "LLMs:")?;
        for e in &c.llm_endpoints {
            let api = match e.api {
                LlmApi::Ollama => "Ollama",
                LlmApi::OpenAiCompatible => "OpenAI-compatible",
            };
            let models = if e.models.is_empty() {
                "no models (pull one, e.g. `ollama pull llama3.2`)".to_string()
            } else {
                e.models.join(", ")
            };
            writeln!(out, "  {} ({api}, {}): {models}", e.name, e.url)?;
        }
    }
    Ok(())
}

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Cpu => "CPU",
        Backend::Cuda => "CUDA",
        Backend::Metal => "Metal",
    }
}

/// Bytes as GiB with one decimal.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / GIB)
}

#[cfg(test)]
mod tests {
    use super::super::{GpuInfo, LlmEndpoint};
    use super::*;

    fn sample() -> Capabilities {
        Capabilities {
            os: "Debian GNU/Linux 12".into(),
            arch: "x86_64".into(),
            hostname: "box".into(),
            cpu_model: "AMD Ryzen 9 7950X".into(),
            logical_cores: 32,
            total_memory_bytes: 64 << 30,
            available_memory_bytes: (48 << 30) + (1 << 29),
            gpus: vec![GpuInfo {
                backend: Backend::Cuda,
                index: 0,
                name: "NVIDIA GeForce RTX 4090".into(),
                memory_bytes: 24 << 30,
                compute_capability: Some((8, 9)),
            }],
            backends: vec![Backend::Cpu, Backend::Cuda],
            llm_endpoints: vec![LlmEndpoint {
                name: "ollama".into(),
                api: LlmApi::Ollama,
                url: "http://127.0.0.1:11434".into(),
                models: vec!["llama3.2:latest".into(), "qwen2.5:7b".into()],
            }],
        }
    }

    #[test]
    fn renders_every_section() {
        let text = render_text(&sample());
        for needle in [
            "OS:        Debian GNU/Linux 12",
            "Arch:      x86_64",
            "Host:      box",
            "CPU:       AMD Ryzen 9 7950X",
            "Cores:     32 logical",
            "RAM:       64.0 GiB total, 48.5 GiB available",
            "[CUDA 0] NVIDIA GeForce RTX 4090, 24.0 GiB memory, compute capability 8.9",
            "Backends:  CPU, CUDA",
            "ollama (Ollama, http://127.0.0.1:11434): llama3.2:latest, qwen2.5:7b",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn renders_absences_with_a_hint() {
        let mut c = sample();
        c.gpus.clear();
        c.llm_endpoints.clear();
        c.backends = vec![Backend::Cpu];
        let text = render_text(&c);
        assert!(text.contains("GPUs:      none"), "{text}");
        assert!(text.contains("Backends:  CPU\n"), "{text}");
        assert!(
            text.contains("none found (is Ollama running? start it with `ollama serve`)"),
            "{text}"
        );
    }
}
