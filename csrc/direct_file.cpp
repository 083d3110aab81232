// direct_file.cpp: placeholder, being written
