from usam.serve import main

main()
