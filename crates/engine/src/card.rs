//! The README.md model card written beside the merged checkpoint.

use amalgam_core::plan::Plan;

/// The model card: what was merged, how, and the config that did it.
pub fn model_card(plan: &Plan, config_text: &str) -> String {
    let mut s = String::new();
    s.push_str("---\nlibrary_name: transformers\ntags:\n- merge\n- amalgam\n");
    if let Some(b) = &plan.base_model {
        s.push_str(&format!("base_model:\n- {b}\n"));
    }
    s.push_str("---\n# Merged model\n\n");
    s.push_str(&format!(
        "This model was made with amalgam using the `{}` merge method.\n\n",
        plan.method
    ));
    s.push_str("## Models merged\n\n");
    for m in &plan.models {
        let role = if Some(m) == plan.base_model.as_ref() {
            " (base)"
        } else {
            ""
        };
        s.push_str(&format!("- `{m}`{role}\n"));
    }
    s.push_str("\n## Configuration\n\n```yaml\n");
    s.push_str(config_text.trim_end());
    s.push_str("\n```\n");
    s
}
