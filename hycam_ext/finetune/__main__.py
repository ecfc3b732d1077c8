"""python -m hycam_ext.finetune"""
from . import main

if __name__ == "__main__":
    main()
