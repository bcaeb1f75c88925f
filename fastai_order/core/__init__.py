"Foundations every job uses: argument checks and one-line command errors, atomic file writes, ranks under data-parallel training"
