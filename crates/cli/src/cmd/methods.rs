//! `amalgam methods`: the registry, for humans.

use anyhow::Result;

/// Print every method with its parameters.
pub fn run() -> Result<()> {
    for m in amalgam_core::methods::registry() {
        println!("{:<18} {}", m.name, m.summary);
        let base = if m.needs_base { "required" } else { "optional" };
        println!(
            "{:<18}   base_model: {base}; models: at least {}{}",
            "",
            m.min_models,
            m.exact_models
                .map(|n| format!(", exactly {n}"))
                .unwrap_or_default()
        );
        if !m.global_params.is_empty() {
            println!("{:<18}   parameters: {}", "", m.global_params.join(", "));
        }
        if !m.model_params.is_empty() {
            println!(
                "{:<18}   per-model parameters: {}",
                "",
                m.model_params.join(", ")
            );
        }
        if m.random {
            println!(
                "{:<18}   random: uses random_seed (Philox; same seed, same output)",
                ""
            );
        }
    }
    Ok(())
}
