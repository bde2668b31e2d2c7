"""``python -m embedkit.cli`` / ``torchrun -m embedkit.cli``: the `embedkit` command (see
``embedkit.commands.embed``), kept under this module name for the launch lines that use it."""

from embedkit.commands.embed import main

if __name__ == "__main__":
    main()
