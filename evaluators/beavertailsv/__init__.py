"""BeaverTails-V (Safe RLHF-V): harmlessness and helpfulness win rates against a reference model."""
