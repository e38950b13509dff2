"""Model-card templates for published adapters (rendered by peft_hcp.hub.card)."""
