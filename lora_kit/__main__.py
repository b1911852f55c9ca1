from lora_kit.cli import main

raise SystemExit(main())
