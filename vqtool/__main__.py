from vqtool.cli import main

# Guarded, so that platforms that spawn encode's reader processes can re-import this module.
if __name__ == "__main__":
    main()
