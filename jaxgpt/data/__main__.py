"""`python -m jaxgpt.data`: prepare a dataset (see jaxgpt.data.preparation)."""

from jaxgpt.data.preparation import main

if __name__ == "__main__":
    main()
