"""Tools that sit beside the streamtrain package: the real instruction corpus builder (asm_corpus)."""
