"""``python -m deepsqueeze``: the same CLI as the ``deepsqueeze`` command."""

from deepsqueeze.cli.app import main

if __name__ == "__main__":
    main()
