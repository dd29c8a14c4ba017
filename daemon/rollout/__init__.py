"""rollout: staged rollouts, their guardrails and rollback."""
