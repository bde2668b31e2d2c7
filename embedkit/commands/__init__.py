"""The console scripts, one module each (embedkit, embedkit-pairs, embedkit-attention, embedkit-report),
and what they share. Nothing outside this package imports from it."""
