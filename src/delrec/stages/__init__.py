"""DELRec training stages: 1 distils the teacher into a soft prompt, 2 fine-tunes the LLM."""
