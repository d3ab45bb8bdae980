18586 bash 0 1
