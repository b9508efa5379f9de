"""DELRec and its ablations (paper Table III and Section V-D), in the paper's order: they differ
in their fields alone (stage 1, soft prompt, prompt slot, stage 2), so the base Method's hooks
serve them all. `wo-sp` is also Table II's LLMSEQPROMPT."""

from __future__ import annotations

from delrec.methods.registry import Method

METHODS = (
    Method("delrec", "DELRec", "stage 1 distils the teacher into a soft prompt; stage 2 fine-tunes the LLM with it"),
    Method("wo-ta", "w/o TA", "stage 1 without the Temporal Analysis task", stage1="own",
           stage1_settings={"tasks": ("rps",)}),
    Method("wo-rps", "w/o RPS", "stage 1 without the Recommendation Pattern Simulating task", stage1="own",
           stage1_settings={"tasks": ("ta",)}),
    Method("wo-lsr", "w/o LSR", "no stage 2: the frozen LLM with the distilled soft prompt", stage2=False),
    Method("ulsr", "w ULSR", "stage 2 also updates the soft prompt", train_soft_prompt=True),
    Method("udpsm", "w UDPSM", "stage 1 also updates the LLM; stage 2 starts from that LLM", stage1="own",
           stage1_settings={"update_llm": True}, stage2_from_stage1_llm=True),
    Method("usp", "w USP", "an untrained soft prompt of the same size in place of the distilled one",
           stage1="none", soft_prompt_source="untrained"),
    Method("wo-dpsm", "w/o DPSM", "no stage 1: the soft-prompt slot left empty", stage1="none", soft_prompt_source="none",
           prompt="empty-slot"),
    Method("mcp", "w MCP", "a hand-written description of the teacher in place of the soft prompt", stage1="none",
           soft_prompt_source="none", prompt="model-card"),
    Method("wo-sp", "w/o SP", "the plain recommendation prompt fine-tuned, without soft prompt or instruction "
           "(LLMSEQPROMPT in the paper's Table II)", stage1="none", soft_prompt_source="none", prompt="plain",
           paper_rows=("LLMSEQPROMPT",)),
)
