// bundle_reader.cpp: placeholder, being written
