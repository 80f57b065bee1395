from trtforge.cli import main

if __name__ == "__main__":  # spawned worker processes import this module too; only the CLI runs main
    main()
