"""What every training stage (a teacher, stage 1, stage 2) shares: its run folder, its clock and
one training loop (delrec.training.loop). Below the teachers, the LLM and the stages, which all
build on it."""
